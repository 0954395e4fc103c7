package peercred

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestFromConn(t *testing.T) {
	dir, err := os.MkdirTemp("", "pc")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	l, err := net.Listen("unix", filepath.Join(dir, "s"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := net.Dial("unix", filepath.Join(dir, "s"))
		if err == nil {
			defer c.Close()
			c.Read(make([]byte, 1))
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cr, err := FromConn(c)
	if err != nil {
		t.Fatal(err)
	}
	if cr.PID != uint32(os.Getpid()) || cr.UID != uint32(os.Getuid()) || cr.GID != uint32(os.Getgid()) {
		t.Fatalf("cred %+v", cr)
	}
	if _, err := FromConn(&net.TCPConn{}); err == nil {
		t.Fatal("tcp conn has no peer cred")
	}
}

func TestGroups(t *testing.T) {
	gs, err := Groups(uint32(os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := os.Getgroups()
	for _, g := range want {
		if !slices.Contains(gs, uint32(g)) {
			t.Fatalf("groups %v lack %d", gs, g)
		}
	}
}
