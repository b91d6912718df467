"""An app whose import lasts until the file ``$SLOW_BOOT_RELEASE`` exists (30 s at most);
it creates ``$SLOW_BOOT_STARTED`` first, so a test knows the import has begun."""

import os
import time

open(os.environ["SLOW_BOOT_STARTED"], "w").close()
_deadline = time.monotonic() + 30.0
while not os.path.exists(os.environ["SLOW_BOOT_RELEASE"]) and time.monotonic() < _deadline:
    time.sleep(0.02)


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"booted\n"]
