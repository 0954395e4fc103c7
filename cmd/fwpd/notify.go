package main

import (
	"fmt"
	"net"
	"os"
)

// sdNotify sends state ("READY=1", "STOPPING=1", ...) to the service
// manager at $NOTIFY_SOCKET, as sd_notify(3) does for Type=notify units:
// one datagram on a unix socket named by a path or, with a leading '@',
// in the abstract namespace. Without $NOTIFY_SOCKET it does nothing.
func sdNotify(state string) error {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return nil
	}
	if name[0] != '/' && name[0] != '@' {
		return fmt.Errorf("NOTIFY_SOCKET=%q: not a unix socket path or an abstract name (@...)", name)
	}
	// net.UnixAddr takes a leading '@' for the abstract namespace, as
	// systemd writes it.
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("NOTIFY_SOCKET=%s: %w", name, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("NOTIFY_SOCKET=%s: %w", name, err)
	}
	return nil
}
