package mgmt

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// store keeps the persistent and boot-time objects in one JSON file,
// replaced whole on each commit that changes them: written to a temporary
// file, fsynced, renamed over the old one, and the directory fsynced. A
// rename is atomic, so a crash leaves the old file or the new one.
type store struct {
	dir, path string
	lock      *os.File
}

func (s *store) close() {
	if s != nil && s.lock != nil {
		s.lock.Close()
	}
}

const storeVersion = 1

type storeFile struct {
	Version int      `json:"version"`
	Objects []Object `json:"objects"`
}

func openStore(dir string) (*store, map[objKey]Object, error) {
	// A new directory's entry must reach the disk too, or a power loss
	// could take it, and the commits in it, away: sync the parent of each
	// directory created.
	var created []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil || filepath.Dir(d) == d {
			break
		}
		created = append(created, d)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	for _, d := range created {
		if err := syncDir(filepath.Dir(d)); err != nil {
			return nil, nil, fmt.Errorf("%w: %w", ErrStore, err)
		}
	}
	s := &store{dir: dir, path: filepath.Join(dir, "policy.json")}
	// One process per store: a second daemon on the same directory would
	// overwrite the first's commits. The kernel drops the lock on exit,
	// even on SIGKILL.
	lk, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	if err := syscall.Flock(int(lk.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lk.Close()
		return nil, nil, fmt.Errorf("%w: %s is in use by another process: %w", ErrStore, dir, err)
	}
	s.lock = lk
	// A leftover temporary file is a commit that never happened.
	_ = os.Remove(s.path + ".tmp")
	objs := map[objKey]Object{}
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return s, objs, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	var f storeFile
	if err := json.Unmarshal(b, &f); err != nil {
		return nil, nil, fmt.Errorf("%w: %s is corrupt: %w", ErrStore, s.path, err)
	}
	if f.Version != storeVersion {
		return nil, nil, fmt.Errorf("%w: %s has version %d, want %d", ErrStore, s.path, f.Version, storeVersion)
	}
	for i, o := range f.Objects {
		if o.Kind() == 0 || !o.lifetime().durable() {
			return nil, nil, fmt.Errorf("%w: %s: object %d is empty or not durable", ErrStore, s.path, i)
		}
		objs[objKey{o.Kind(), o.Key()}] = o
	}
	return s, objs, nil
}

func (s *store) write(objs map[objKey]Object) error {
	f := storeFile{Version: storeVersion, Objects: make([]Object, 0, len(objs))}
	for _, k := range sortedKeys(objs) {
		f.Objects = append(f.Objects, objs[k])
	}
	tmp := s.path + ".tmp"
	fh, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(fh, 1<<16)
	err = json.NewEncoder(w).Encode(&f)
	if err == nil {
		err = w.Flush()
	}
	if err == nil {
		err = fh.Sync()
	}
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return err
	}
	// The rename is the commit point: a failed directory sync after it
	// cannot undo the commit, so it is not reported as a failure.
	_ = syncDir(s.dir)
	return nil
}

// syncDir makes a directory's entries (a rename, a new file) durable; a
// variable for tests.
var syncDir = func(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
