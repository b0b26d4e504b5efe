#!/bin/sh
# A tiny demo app for `make run`: prints a line a second on stdout (and every fifth on stderr),
# reports the signals it receives, and exits cleanly on SIGTERM/SIGINT.
trap 'echo "demo: got SIGHUP (reload)"' HUP
trap 'echo "demo: got SIGUSR1"' USR1
trap 'echo "demo: got SIGTERM, exiting 0"; exit 0' TERM INT
echo "demo: started as pid $$ (parent $PPID), PORT=$PORT"
i=0
while :; do
  i=$((i + 1))
  echo "demo: tick $i"
  [ $((i % 5)) -eq 0 ] && echo "demo: tick $i on stderr" >&2
  sleep 1 & wait $!
done
