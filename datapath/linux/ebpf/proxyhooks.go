//go:build linux

package ebpf

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf/link"

	"fwp/internal/unix"
)

// A socket runs the hooks of the cgroup it was created in, so a proxy
// outside the cgroups the datapath is attached to would find no
// SO_ORIGINAL_DST or SOL_FWP answer on its accepted sockets, and its
// records would not be taken. The proxy hooks (getsockopt, setsockopt,
// sockops, sock_release: those that serve a proxy's own sockets) are
// attached where proxies run: the cgroups named with AttachProxy (fwpd's
// --proxy-cgroup) and, at each Apply, the cgroup of every redirect's
// target process.

// AttachProxy attaches the proxy hooks to a cgroup v2 directory where
// redirect targets (transparent proxies) run; they stay until Detach of
// the same path or Close. A cgroup under one the datapath is already
// attached to (fully or for proxies) needs nothing: its sockets run the
// ancestor's hooks.
func (d *Datapath) AttachProxy(cgroupPath string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	return d.attachProxy(filepath.Clean(cgroupPath))
}

// attachProxy is AttachProxy with d.mu held.
func (d *Datapath) attachProxy(path string) error {
	if d.covered(path) {
		return nil
	}
	links, err := d.attachHooks(path, func(h hook) bool { return h.proxy })
	if err != nil {
		return err
	}
	if d.proxyLinks == nil {
		d.proxyLinks = map[string][]link.Link{}
	}
	d.proxyLinks[path] = links
	return nil
}

// covered reports whether the sockets of cgroup path already run the
// proxy hooks: it or an ancestor has them.
func (d *Datapath) covered(path string) bool {
	for _, m := range []map[string][]link.Link{d.links, d.proxyLinks} {
		for p := range m {
			p = filepath.Clean(p)
			if path == p || strings.HasPrefix(path, p+"/") {
				return true
			}
		}
	}
	return false
}

// ProxyCgroups returns the cgroups the proxy hooks were attached to alone
// (AttachProxy, or a redirect target's at Apply).
func (d *Datapath) ProxyCgroups() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]string, 0, len(d.proxyLinks))
	for p := range d.proxyLinks {
		out = append(out, p)
	}
	return out
}

// attachTargets attaches the proxy hooks to the cgroup of each target
// process of the policy's redirects. A target that does not exist (yet)
// is skipped; one on the cgroup2 root is left to AttachProxy, which the
// caller decides (every socket of the machine would run the hooks). d.mu
// is held.
func (d *Datapath) attachTargets(p *Policy) error {
	// The links of cgroups since removed serve nothing: released here, so
	// targets coming and going in fresh cgroups do not pile them up.
	for path, links := range d.proxyLinks {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			for _, l := range links {
				if d.opts.KeepHooks {
					_ = l.Unpin()
				}
				_ = l.Close()
			}
			delete(d.proxyLinks, path)
		}
	}
	var root string
	for _, r := range p.redirects {
		if r.Pid == 0 || r.Port == 0 {
			continue // no target named, or a bind redirect
		}
		rel, err := procCgroup(r.Pid)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("%w: the cgroup of redirect target pid %d: %v", ErrUnavailable, r.Pid, err)
		}
		if rel == "/" {
			continue
		}
		if root == "" {
			if root, err = unix.FindCgroup2(); err != nil {
				return fmt.Errorf("%w: %v", ErrUnavailable, err)
			}
		}
		if err := d.attachProxy(filepath.Join(root, rel)); err != nil {
			return fmt.Errorf("redirect target pid %d: %w", r.Pid, err)
		}
	}
	return nil
}

// procCgroup returns a process's cgroup v2 path relative to the
// hierarchy's root ("/" for the root), from /proc/<pid>/cgroup.
func procCgroup(pid uint32) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rel, ok := strings.CutPrefix(s.Text(), "0::"); ok {
			// A cgroup removed while the process was in it reads
			// "... (deleted)": nothing to attach to.
			if strings.HasSuffix(rel, " (deleted)") {
				return "", os.ErrNotExist
			}
			return rel, nil
		}
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", errors.New("no cgroup v2 entry")
}

// ProcessOnCgroupRoot reports whether this process runs on the cgroup2
// root (fwpd's default for --proxy-cgroup depends on it).
func ProcessOnCgroupRoot() (bool, error) {
	rel, err := procCgroup(uint32(os.Getpid()))
	if err != nil {
		return false, err
	}
	return rel == "/", nil
}
