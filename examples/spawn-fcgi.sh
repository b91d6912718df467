#!/bin/sh
# spawn-fcgi creates the socket (owner and mode for the web server) and runs fcgi-manager
# on it: the socket is passed on fd 0, and fcgi-manager-fd0.toml says bind = "fd:0".
# -n keeps it in the foreground (daemontools, runit, s6, a container); without -n,
# spawn-fcgi forks it into the background and -P writes its pid.
# The guide's .fcgi file works the same way: replace the last line with
#     /var/www/yourapplication/yourapplication.fcgi
exec spawn-fcgi -n -s /run/yourapplication/fcgi.sock -M 0660 -U www-data -G www-data -- \
    /usr/local/bin/fcgi-manager -c /etc/yourapplication/fcgi-manager-fd0.toml start --foreground
