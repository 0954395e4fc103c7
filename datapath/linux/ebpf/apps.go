package ebpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"fwp/engine"
)

// AppIdentity is an executable as the kernel knows it: the device (the
// kernel's dev_t encoding, major<<20 | minor) and inode number of the file.
// A hard link or a bind mount of a file is the same identity; a copy is
// another, as an application in WFP is its image, not its name.
type AppIdentity struct {
	Dev uint32
	Ino uint64
}

func (a AppIdentity) String() string {
	return fmt.Sprintf("%d:%d:%d", a.Dev>>20, a.Dev&0xfffff, a.Ino)
}

// ResolveApp returns the identity of the file path names now, following
// symlinks (a process exec'd through a symlink runs the file it points
// to, and /proc/PID/exe names that file). A missing file wraps
// os.ErrNotExist.
func ResolveApp(path string) (AppIdentity, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return AppIdentity{}, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return AppIdentity{Dev: kernelDev(uint64(st.Dev)), Ino: uint64(st.Ino)}, nil
}

// kernelDev turns stat's st_dev into the kernel's internal dev_t, which
// the hooks read from the executable's super block.
func kernelDev(d uint64) uint32 {
	major := uint32((d>>8)&0xfff) | uint32(d>>32)&^0xfff
	minor := uint32(d&0xff) | uint32(d>>12)&^0xff
	return major<<20 | minor&0xfffff
}

// appResolution is what an app id path named when a policy was compiled.
type appResolution struct {
	id AppIdentity
	ok bool // false: no file at the path (the condition matches no process)
}

func resolveAppPath(p *Policy, c engine.Condition) (appResolution, error) {
	path := c.Value.Str()
	if r, ok := p.apps[path]; ok {
		return r, nil
	}
	if !filepath.IsAbs(path) {
		return appResolution{}, fmt.Errorf("%w: %s: the kernel identifies an application by the file an absolute path names", ErrNotSupported, c)
	}
	id, err := ResolveApp(path)
	var r appResolution
	switch {
	case err == nil:
		r = appResolution{id: id, ok: true}
	case errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOTDIR):
		// No file yet: nothing runs it. The policy is compiled again
		// when one appears (WatchApps).
	default:
		return appResolution{}, fmt.Errorf("app id %s: %w", c, err)
	}
	p.apps[path] = r
	return r, nil
}

// compileApps handles app id conditions: EQUAL and NOT_EQUAL on a path,
// resolved to the file's identity now. Every identity a condition names
// gets its class; every other executable is in the default class.
func (lp *layerPolicy) compileApps(p *Policy, g [][]engine.Condition, wild bitvec) error {
	eq := map[AppIdentity][]int{}
	type ne struct {
		rank int
		id   appResolution
	}
	var nes []ne
	neRanks := map[int]bool{}
	for r, cs := range g {
		for _, c := range cs {
			if c.Value.Type() != engine.TypeString {
				return rankError{r, fmt.Errorf("%w: %s: an app id is a path", ErrNotSupported, c)}
			}
			res, err := resolveAppPath(p, c)
			if err != nil {
				return rankError{r, err}
			}
			switch c.Match {
			case engine.MatchEqual:
				if res.ok {
					eq[res.id] = append(eq[res.id], r)
				}
			case engine.MatchNotEqual:
				nes = append(nes, ne{r, res})
				neRanks[r] = true
				if _, ok := eq[res.id]; res.ok && !ok {
					eq[res.id] = nil
				}
			default:
				return rankError{r, fmt.Errorf("%w: %s: the kernel matches app ids only with equal and not_equal (a file's identity has no prefix or case)", ErrNotSupported, c)}
			}
		}
	}
	c := &lp.classes[fieldApp]
	def := wild.clone()
	for r := range neRanks {
		def.set(r) // an executable no condition names differs from every one
	}
	lp.def[fieldApp] = c.intern(def)
	lp.apps = map[AppIdentity]uint32{}
	for id, ranks := range eq {
		b := wild.clone()
		for _, r := range ranks {
			b.set(r)
		}
		for _, n := range nes {
			if !n.id.ok || n.id.id != id {
				b.set(n.rank)
			}
		}
		lp.apps[id] = c.intern(b)
	}
	return nil
}

// AppPaths returns the executable paths the policy's app id conditions
// name, sorted: the files to watch (WatchApps) so the policy follows them.
func (p *Policy) AppPaths() []string {
	out := make([]string, 0, len(p.apps))
	for path := range p.apps {
		out = append(out, path)
	}
	slices.Sort(out)
	return out
}

// AppsChanged reports whether some path of the policy's app id conditions
// names another file now than when the policy was compiled (a package
// upgrade renamed a new file over it, or it appeared or went): the policy
// must be compiled again to follow it.
func (p *Policy) AppsChanged() bool {
	for path, was := range p.apps {
		id, err := ResolveApp(path)
		if now := err == nil; now != was.ok || now && id != was.id {
			return true
		}
	}
	return false
}
