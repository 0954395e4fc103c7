package api

import (
	"net/netip"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"fwp/engine"
)

// TestFromNetEvent: every field of an engine net event, gid and cgroup id
// included, reaches the wire message, and survives its encoding.
func TestFromNetEvent(t *testing.T) {
	ev := engine.NetEvent{Seq: 9, Time: time.Unix(5, 6), Type: engine.EventClassifyRedirect, Layer: engine.LayerALEConnectRedirectV4,
		Filter: 12, Callout: 3, Reason: engine.ReasonFilterBlock, Protocol: 6,
		Local: netip.MustParseAddrPort("10.0.0.1:4000"), Remote: netip.MustParseAddrPort("[2001:db8::1]:80"),
		AppID: "/usr/bin/curl", UserID: 1000, GroupID: 1001, CgroupID: 1<<40 + 7, ProcessID: 4242}
	n := FromNetEvent(ev)
	b, err := proto.Marshal(n)
	if err != nil {
		t.Fatal(err)
	}
	var got NetEvent
	if err := proto.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got.Seq != 9 || got.TimeUnixNano != 5_000_000_006 || got.Type != "classify_redirect" || got.Layer != ev.Layer.String() ||
		got.FilterId != 12 || got.Callout != 3 || got.Reason != ev.Reason.String() || got.Protocol != 6 ||
		got.Local != "10.0.0.1:4000" || got.Remote != "[2001:db8::1]:80" || got.AppId != "/usr/bin/curl" ||
		got.UserId != 1000 || got.GroupId != 1001 || got.CgroupId != 1<<40+7 || got.ProcessId != 4242 {
		t.Fatalf("FromNetEvent(%+v) = %v", ev, &got)
	}
	// Unknown addresses stay empty rather than "invalid AddrPort".
	if z := FromNetEvent(engine.NetEvent{}); z.Local != "" || z.Remote != "" || z.GroupId != 0 || z.CgroupId != 0 {
		t.Fatalf("zero event: %v", z)
	}
}
