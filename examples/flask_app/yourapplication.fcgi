#!/usr/bin/env python3
from fcgi_manager import WSGIServer
from yourapplication import app

if __name__ == '__main__':
    WSGIServer(app).run()
    # nginx and lighttpd "socket" mode connect to a socket the app creates itself:
    # WSGIServer(app, bindAddress='/run/yourapplication/fcgi.sock', umask=0o007).run()
    # (umask as in flup: the socket is 0777 & ~umask; give its group to the web server,
    # or umask=0 to let every local user connect)
