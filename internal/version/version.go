package version

import (
	"fmt"
	"runtime/debug"
)

// Info is a build's identity.
type Info struct {
	Version   string `json:"version"`            // module version; "(devel)" for a build from a work tree
	Revision  string `json:"revision,omitempty"` // VCS revision, when the go command stamped it
	Modified  bool   `json:"modified,omitempty"` // built from a work tree with uncommitted changes
	GoVersion string `json:"go_version"`
}

// Get returns this binary's build information.
func Get() Info {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return Info{Version: "unknown"}
	}
	return fromBuildInfo(bi)
}

func fromBuildInfo(bi *debug.BuildInfo) Info {
	in := Info{Version: bi.Main.Version, GoVersion: bi.GoVersion}
	if in.Version == "" {
		in.Version = "(devel)"
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			in.Revision = s.Value
		case "vcs.modified":
			in.Modified = s.Value == "true"
		}
	}
	return in
}

// String is one line: "v1.2.3 (rev 0123abcd…, modified) go1.26".
func (i Info) String() string {
	s := i.Version
	if i.Revision != "" {
		rev := i.Revision
		if len(rev) > 12 {
			rev = rev[:12]
		}
		s += " (rev " + rev
		if i.Modified {
			s += ", modified"
		}
		s += ")"
	}
	if i.GoVersion != "" {
		s += fmt.Sprintf(" %s", i.GoVersion)
	}
	return s
}
