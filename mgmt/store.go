package mgmt

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"fwp/internal/trust"
)

// store keeps the persistent and boot-time objects on disk in two files:
//
//	policy.json     a snapshot: every object, and the generation it starts
//	policy.journal  the commits since: a header line naming the same
//	                generation, then one line per commit (objects put,
//	                keys deleted), appended and fsynced
//
// A commit costs one append, not a rewrite of every object. When the
// journal outgrows the snapshot, the next commit compacts: a new snapshot
// of generation g+1 (written to a temporary file, fsynced, renamed), then
// a new journal of generation g+1 (the same way). A crash between the two
// leaves a journal of generation g beside a snapshot of g+1: it is
// ignored, its commits being in the snapshot. A crash during an append
// leaves a last line without its newline, which was never acknowledged:
// it is dropped at load. A complete line that does not parse, or a
// journal ahead of its snapshot, is corruption: refused, never emptied.
type store struct {
	dir, path, jpath string
	lock             *os.File

	gen      uint64
	journal  *os.File // open for writing at jsize
	jsize    int64    // bytes of whole lines
	snapSize int64    // bytes of the last snapshot, for when to compact
	broken   bool     // the journal's tail is unknown: compact before appending
}

func (s *store) close() {
	if s == nil {
		return
	}
	if s.journal != nil {
		s.journal.Close()
	}
	if s.lock != nil {
		s.lock.Close()
	}
}

const storeVersion = 1

type storeFile struct {
	Version int      `json:"version"`
	Gen     uint64   `json:"gen,omitempty"`
	Objects []Object `json:"objects"`
}

type journalHeader struct {
	Journal int    `json:"journal"`
	Gen     uint64 `json:"gen"`
}

// journalRecord is one commit: the objects it put and the keys it deleted.
type journalRecord struct {
	Put []Object    `json:"put,omitempty"`
	Del []storedRef `json:"del,omitempty"`
}

type storedRef struct {
	Kind Kind   `json:"kind"`
	Key  string `json:"key"`
}

// minCompact is the journal size below which it is never compacted: small
// stores append too. A variable for tests.
var minCompact int64 = 1 << 20

// fdatasync makes an append durable; a variable for tests.
var fdatasync = func(f *os.File) error { return syscall.Fdatasync(int(f.Fd())) }

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
	// A directory or file another user can write would let them replace
	// the policy the next start loads (a permit-all at the top weight):
	// refuse to start instead, naming it.
	if err := trust.Dir("state directory", dir); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	s := &store{dir: dir, path: filepath.Join(dir, "policy.json"), jpath: filepath.Join(dir, "policy.journal")}
	for _, name := range []string{"lock", "policy.json", "policy.journal"} {
		p := filepath.Join(dir, name)
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err := trust.File("store file", p); err != nil {
			return nil, nil, fmt.Errorf("%w: %w", ErrStore, err)
		}
	}
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
	objs, err := s.load()
	if err != nil {
		s.close()
		return nil, nil, err
	}
	return s, objs, nil
}

// load reads the snapshot and replays the journal, then opens the journal
// for the next commit.
func (s *store) load() (map[objKey]Object, error) {
	// A leftover temporary file is a snapshot or journal never renamed in.
	_ = os.Remove(s.path + ".tmp")
	_ = os.Remove(s.jpath + ".tmp")
	objs := map[objKey]Object{}
	b, err := os.ReadFile(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("%w: %w", ErrStore, err)
	default:
		f, ok := decodeSnapshotFast(b)
		if !ok {
			if err := json.Unmarshal(b, &f); err != nil {
				return nil, fmt.Errorf("%w: %s is corrupt: %w", ErrStore, s.path, err)
			}
		}
		if f.Version != storeVersion {
			return nil, fmt.Errorf("%w: %s has version %d, want %d", ErrStore, s.path, f.Version, storeVersion)
		}
		for i, o := range f.Objects {
			if err := checkStored(o); err != nil {
				return nil, fmt.Errorf("%w: %s: object %d %w", ErrStore, s.path, i, err)
			}
			objs[objKey{o.Kind(), o.Key()}] = o
		}
		s.gen, s.snapSize = f.Gen, int64(len(b))
	}
	j, err := os.OpenFile(s.jpath, os.O_RDWR, 0o600)
	if errors.Is(err, fs.ErrNotExist) {
		return objs, s.newJournal()
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	s.journal = j
	fresh, err := s.replay(j, objs)
	if err != nil {
		return nil, err
	}
	if !fresh {
		// Left by a compaction that stopped after its snapshot: its
		// commits are in the snapshot.
		j.Close()
		s.journal = nil
		return objs, s.newJournal()
	}
	// Drop a torn last line, so that the next append starts a line.
	if err := j.Truncate(s.jsize); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrStore, err)
	}
	return objs, nil
}

// replay applies the journal's commits to objs; it reports false for a
// journal of an older generation (nothing applied).
func (s *store) replay(j *os.File, objs map[objKey]Object) (bool, error) {
	r := bufio.NewReaderSize(j, 1<<16)
	corrupt := func(what string, err error) (bool, error) {
		return false, fmt.Errorf("%w: %s is corrupt at byte %d: %s: %w", ErrStore, s.jpath, s.jsize, what, err)
	}
	line, err := r.ReadBytes('\n')
	if err == io.EOF {
		// Not even a whole header: the journal was never renamed in whole
		// (impossible but by hand); its generation is unknown.
		return corrupt("header", io.ErrUnexpectedEOF)
	}
	if err != nil {
		return false, fmt.Errorf("%w: %w", ErrStore, err)
	}
	var h journalHeader
	if err := json.Unmarshal(line, &h); err != nil || h.Journal != 1 {
		if err == nil {
			err = fmt.Errorf("journal version %d, want 1", h.Journal)
		}
		return corrupt("header", err)
	}
	switch {
	case h.Gen < s.gen:
		return false, nil
	case h.Gen > s.gen:
		return corrupt("header", fmt.Errorf("journal generation %d ahead of the snapshot's %d", h.Gen, s.gen))
	}
	s.jsize = int64(len(line))
	for {
		line, err := r.ReadBytes('\n')
		if err == io.EOF {
			return true, nil // a torn last line (len(line) > 0) was never acknowledged
		}
		if err != nil {
			return false, fmt.Errorf("%w: %w", ErrStore, err)
		}
		rec, ok := decodeRecordFast(line[:len(line)-1])
		if !ok {
			// Not as the encoder writes it: encoding/json decides.
			dec := json.NewDecoder(bytes.NewReader(line))
			dec.DisallowUnknownFields()
			if err := dec.Decode(&rec); err != nil {
				return corrupt("commit", err)
			}
			if _, err := dec.Token(); err != io.EOF {
				return corrupt("commit", fmt.Errorf("more than one value on the line"))
			}
		}
		for i, o := range rec.Put {
			if err := checkStored(o); err != nil {
				return corrupt(fmt.Sprintf("object %d", i), err)
			}
		}
		for _, d := range rec.Del {
			if d.Kind == 0 || d.Key == "" {
				return corrupt("deleted key", fmt.Errorf("kind %q key %q", d.Kind, d.Key))
			}
			delete(objs, objKey{d.Kind, d.Key})
		}
		for _, o := range rec.Put {
			objs[objKey{o.Kind(), o.Key()}] = o
		}
		s.jsize += int64(len(line))
	}
}

// checkStored refuses an object no commit could have stored.
func checkStored(o Object) error {
	if o.Kind() == 0 || !o.lifetime().durable() {
		return errors.New("is empty or not durable")
	}
	return nil
}

// write makes a commit's changes to old durable: one journal append, or a
// compaction when the journal has outgrown the snapshot. On error nothing
// of the commit is in the store.
func (s *store) write(old map[objKey]Object, changes []storeChange) error {
	if s.broken || s.jsize > max(minCompact, s.snapSize) {
		return s.compact(applyChanges(old, changes))
	}
	// The line goes to the file in pieces (a million filters are ~150
	// MB); it counts only once whole and synced.
	e := &encWriter{w: io.NewOffsetWriter(s.journal, s.jsize), b: make([]byte, 0, 4096)}
	if e.writeRecord(old, changes) {
		return nil
	}
	err := e.err
	if err == nil {
		err = fdatasync(s.journal)
	}
	if err != nil {
		// Take the line back: a restart must not replay a commit that
		// failed. If even that fails, the journal cannot be trusted:
		// replace it at once by a snapshot of the state before the commit.
		if terr := s.journal.Truncate(s.jsize); terr != nil {
			s.broken = true
			if cerr := s.compact(old); cerr != nil {
				return errors.Join(err, terr, cerr)
			}
		}
		return err
	}
	s.jsize += e.n
	return nil
}

// applyChanges is old with changes applied.
func applyChanges(old map[objKey]Object, changes []storeChange) map[objKey]Object {
	objs := make(map[objKey]Object, len(old)+len(changes))
	for k, v := range old {
		objs[k] = v
	}
	for _, c := range changes {
		if c.o == nil {
			delete(objs, c.k)
		} else {
			objs[c.k] = *c.o
		}
	}
	return objs
}

// compact writes objs as the snapshot of the next generation, then an
// empty journal of that generation.
func (s *store) compact(objs map[objKey]Object) error {
	f := storeFile{Version: storeVersion, Gen: s.gen + 1, Objects: make([]Object, 0, len(objs))}
	for _, k := range sortedKeys(objs) {
		f.Objects = append(f.Objects, objs[k])
	}
	n, err := writeFileSync(s.path, func(w io.Writer) error {
		e := &encWriter{w: w, b: make([]byte, 0, 4096)}
		e.writeSnapshot(&f)
		return e.err
	})
	if err != nil {
		return err
	}
	// The snapshot's rename is the commit point: from here on the old
	// journal is ignored at load.
	s.gen, s.snapSize = f.Gen, n
	if s.journal != nil {
		s.journal.Close()
		s.journal = nil
	}
	s.broken = true // until the new journal is in place
	if err := s.newJournal(); err != nil {
		// The commit is in the snapshot: not a failure of this commit;
		// the next one compacts again.
		return nil
	}
	s.broken = false
	return nil
}

// newJournal replaces the journal by an empty one of the current
// generation and opens it.
func (s *store) newJournal() error {
	h, _ := json.Marshal(journalHeader{Journal: 1, Gen: s.gen})
	h = append(h, '\n')
	if _, err := writeFileSync(s.jpath, func(w io.Writer) error { _, err := w.Write(h); return err }); err != nil {
		return fmt.Errorf("%w: %w", ErrStore, err)
	}
	j, err := os.OpenFile(s.jpath, os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrStore, err)
	}
	s.journal, s.jsize = j, int64(len(h))
	return nil
}

// writeFileSync replaces path with what fill writes, crash-safely: a
// temporary file, fsynced, renamed over path, and the directory synced.
// It returns the bytes written.
func writeFileSync(path string, fill func(io.Writer) error) (int64, error) {
	tmp := path + ".tmp"
	fh, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	cw := &countWriter{w: fh}
	w := bufio.NewWriterSize(cw, 1<<16)
	err = fill(w)
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
		err = os.Rename(tmp, path)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return 0, err
	}
	// The rename is the commit point: a failed directory sync after it
	// cannot undo it, so it is not reported as a failure.
	_ = syncDir(filepath.Dir(path))
	return cw.n, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
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
