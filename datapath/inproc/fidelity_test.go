package inproc_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"fwp/datapath/inproc"
	"fwp/engine"
)

// Issue 12, item 1: a connection whose AUTH_RECV_ACCEPT an asynchronous
// callout pended and then permitted is authorized again by the whole
// layer: a lower sublayer's block still drops it, as it does when the
// callout permits inline.
func TestAcceptPendThenLowerBlock(t *testing.T) {
	for _, async := range []bool{false, true} {
		a, decide, asked := asyncAuth()
		reg := a.Registration()
		if !async {
			reg = engine.CalloutRegistration{Classify: func(req *engine.ClassifyRequest, out *engine.ClassifyOut) { out.Action = engine.ActionPermit }}
		}
		e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour},
			callout{key: "acc", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 20, reg: reg},
			callout{key: "low", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 10, action: engine.ActionBlock})
		dp := inproc.New(e, inproc.Options{})
		ln := listen(t, &inproc.ListenConfig{Datapath: dp})
		accepted := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				c.Close()
			}
			accepted <- err
		}()
		c, err := net.Dial("tcp4", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if async {
			<-asked
			decide <- engine.ActionPermit
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, context.DeadlineExceeded) || isTimeoutErr(err) {
			t.Fatalf("async=%v: the connection a lower sublayer blocks is open: %v", async, err)
		}
		c.Close()
		ln.Close()
		if err := <-accepted; !errors.Is(err, net.ErrClosed) {
			t.Fatalf("async=%v: Accept returned %v, want only ErrClosed", async, err)
		}
		noLeaks(t, e)
	}
}

// The same for a UDP socket's first datagram from a remote.
func TestDatagramPendThenLowerBlock(t *testing.T) {
	a, decide, asked := asyncAuth()
	e, _ := newEngine(t, engine.Options{PendTimeout: time.Hour},
		callout{key: "in", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 20, reg: a.Registration()},
		callout{key: "low", layer: engine.LayerALEAuthRecvAcceptV4, sublayer: 10, action: engine.ActionBlock})
	pc, err := (&inproc.ListenConfig{Datapath: inproc.New(e, inproc.Options{})}).ListenPacket(context.Background(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	src := mustPacket(t)
	if _, err := src.WriteTo([]byte("hello"), pc.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	read := make(chan error, 1)
	go func() {
		pc.SetReadDeadline(time.Now().Add(2 * time.Second))
		_, _, err := pc.ReadFrom(make([]byte, 64))
		read <- err
	}()
	<-asked
	decide <- engine.ActionPermit
	if err := <-read; !isTimeout(err) {
		t.Fatalf("the datagram a lower sublayer blocks was read (err %v)", err)
	}
	pc.Close()
	noLeaks(t, e)
}

func isTimeoutErr(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
