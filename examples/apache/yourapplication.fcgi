#!/usr/bin/env python3
#: optional path to your local python site-packages folder
# import sys
# sys.path.insert(0, '<your_local_path>/lib/python<your_python_version>/site-packages')

from fcgi_manager import WSGIServer
from yourapplication import app

if __name__ == '__main__':
    # script_name="" replaces the guide's ScriptNameStripper: the RewriteRule makes
    # SCRIPT_NAME "/yourapplication.fcgi", and the app is meant to be at the root.
    WSGIServer(app, script_name="").run()
