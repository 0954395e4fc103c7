//go:build linux

package ebpf

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"unsafe"

	"golang.org/x/sys/unix"
)

// AppWatcher reports when a file an app id path names may have been
// replaced, so the policy is compiled again and follows the path: a
// package upgrade writes the new executable beside the old one and renames
// it over (a new inode at the same path), which no watch on the old file
// sees. It watches the directories of the paths (and of their symlinks'
// targets) with inotify for names created, moved or removed.
type AppWatcher struct {
	f       *os.File
	changed chan struct{}
	done    chan struct{}
	names   map[int32]map[string]bool // watch descriptor -> names watched in its directory
}

// appWatchMask: the events that can change which file a name in a
// directory refers to, or remove the directory.
const appWatchMask = unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_DELETE |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF | unix.IN_ONLYDIR

// WatchApps watches the paths. Watch first, then compile (or check
// Policy.AppsChanged): a change between the two is not missed. A path
// whose directory does not exist yet is watched at its nearest existing
// ancestor, for the missing component.
func WatchApps(paths []string) (*AppWatcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("inotify: %w", err)
	}
	w := &AppWatcher{f: os.NewFile(uintptr(fd), "inotify"), changed: make(chan struct{}, 1), done: make(chan struct{}),
		names: map[int32]map[string]bool{}}
	for _, p := range paths {
		targets := []string{filepath.Clean(p)}
		if r, err := filepath.EvalSymlinks(p); err == nil && r != targets[0] {
			targets = append(targets, r)
		}
		for _, t := range targets {
			if err := w.add(fd, t); err != nil {
				w.f.Close()
				return nil, err
			}
		}
	}
	go w.read()
	return w, nil
}

func (w *AppWatcher) add(fd int, path string) error {
	dir, name := filepath.Dir(path), filepath.Base(path)
	for {
		wd, err := unix.InotifyAddWatch(fd, dir, appWatchMask)
		if err == nil {
			if w.names[int32(wd)] == nil {
				w.names[int32(wd)] = map[string]bool{}
			}
			w.names[int32(wd)][name] = true
			return nil
		}
		if !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.ENOTDIR) || dir == "/" {
			return fmt.Errorf("watch %s: %w", dir, err)
		}
		dir, name = filepath.Dir(dir), filepath.Base(dir)
	}
}

// Changed receives a value after a watched path may name another file
// (several changes may coalesce into one).
func (w *AppWatcher) Changed() <-chan struct{} { return w.changed }

// Close stops watching.
func (w *AppWatcher) Close() error {
	err := w.f.Close() // wakes the reader
	<-w.done
	return err
}

func (w *AppWatcher) read() {
	defer close(w.done)
	buf := make([]byte, 64*1024)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			end := off + unix.SizeofInotifyEvent + int(ev.Len)
			if end > n {
				break // the kernel writes whole events; never past the read
			}
			name := buf[off+unix.SizeofInotifyEvent : end]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i] // NUL padded
			}
			off = end
			if ev.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_Q_OVERFLOW|unix.IN_IGNORED) != 0 || w.names[ev.Wd][string(name)] {
				select {
				case w.changed <- struct{}{}:
				default:
				}
			}
		}
	}
}
