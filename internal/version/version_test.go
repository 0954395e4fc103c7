package version

import (
	"runtime/debug"
	"strings"
	"testing"
)

func TestFromBuildInfo(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26.0", Main: debug.Module{Path: "fwp", Version: "v0.3.0"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123"}, {Key: "vcs.modified", Value: "true"}}}
	in := fromBuildInfo(bi)
	if in != (Info{Version: "v0.3.0", Revision: "0123456789abcdef0123", Modified: true, GoVersion: "go1.26.0"}) {
		t.Fatalf("%+v", in)
	}
	if s := in.String(); s != "v0.3.0 (rev 0123456789ab, modified) go1.26.0" {
		t.Fatalf("String: %q", s)
	}
	if s := fromBuildInfo(&debug.BuildInfo{GoVersion: "go1.26.0"}).String(); s != "(devel) go1.26.0" {
		t.Fatalf("no version: %q", s)
	}
	if g := Get(); !strings.HasPrefix(g.GoVersion, "go") {
		t.Fatalf("Get: %+v", g)
	}
}
