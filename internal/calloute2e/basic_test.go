package calloute2e

import (
	"testing"

	"fwp/engine"
)

var connV4 = engine.LayerALEAuthConnectV4

func TestRemoteCalloutPermitBlock(t *testing.T) {
	d := startDaemon(t)
	d.apply(calloutObj("co-permit", connV4), calloutObj("co-block", connV4),
		filterObj("f-permit", connV4, "callout_terminating", "co-permit", "10", nil, portIs(80)),
		filterObj("f-block", connV4, "callout_terminating", "co-block", "10", nil, portIs(81)))
	// Unregistered: the filter's default (block, no PERMIT_IF_CALLOUT_UNREGISTERED).
	if r := d.classify(connV4, "10.1.1.1:80", nil); r.Action != engine.ActionBlock || r.Reason != engine.ReasonCalloutUnregisteredBlock {
		t.Fatalf("before registration: %+v", r)
	}
	p := startProg(t, d, "0s", "co-permit=permit", "co-block=block")
	if r := d.classify(connV4, "10.1.1.1:80", nil); r.Action != engine.ActionPermit || r.Reason != engine.ReasonCalloutPermit {
		t.Fatalf("remote permit: %+v", r)
	}
	if r := d.classify(connV4, "10.1.1.1:81", nil); r.Action != engine.ActionBlock || r.Reason != engine.ReasonCalloutBlock {
		t.Fatalf("remote block: %+v", r)
	}
	if i := d.info("co-permit"); !i.Registered || i.Calls != 1 || int(i.PID) != p.cmd.Process.Pid {
		t.Fatalf("listing: %+v (program pid %d)", i, p.cmd.Process.Pid)
	}
}
