package trust

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
)

// ErrUntrusted means a path another local user could write or replace.
var ErrUntrusted = errors.New("fwp: untrusted path")

// PathError names the path that is not trusted, its owner and its mode.
type PathError struct {
	What   string // what fwpd uses it for, e.g. "state directory"
	Path   string // the offending path: the object itself or an ancestor
	UID    uint32
	Mode   fs.FileMode
	Reason string
}

func (e *PathError) Error() string {
	owner := strconv.FormatUint(uint64(e.UID), 10)
	if u, err := user.LookupId(owner); err == nil {
		owner += " (" + u.Username + ")"
	}
	return fmt.Sprintf("%v: %s %s is owned by uid %s with mode %s: %s", ErrUntrusted, e.What, e.Path, owner, e.Mode, e.Reason)
}

func (e *PathError) Unwrap() error { return ErrUntrusted }

// euid is the user fwpd runs as; a variable for tests.
var euid = uint32(os.Geteuid())

func ownedWell(uid uint32) bool { return uid == 0 || uid == euid }

// Dir checks the directory dir, which must exist, and every directory
// above it. what names its use in errors ("state directory").
func Dir(what, dir string) error {
	return check(what, dir, true)
}

// File checks the file path, which must exist, and every directory above
// it: a regular file (or, on bpffs, a pin), not a symbolic link.
func File(what, path string) error {
	return check(what, path, false)
}

func check(what, path string, dir bool) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("%s %s: %w", what, path, err)
	}
	if !dir {
		// A file is opened in a trusted directory by name: a symbolic
		// link there is one that an owner put, but still refused, as
		// the store never makes one.
		st, err := os.Lstat(abs)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if st.Mode()&fs.ModeSymlink != 0 {
			return pathErr(what, abs, st, "a symbolic link, where a file is expected")
		}
	}
	// The resolved path first, so that an error names the directory a
	// link leads to, not the link; then the directories the literal path
	// walks through, where the links live.
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if err := chain(what, real, dir); err != nil {
		return err
	}
	if real != abs {
		return chain(what, abs, dir)
	}
	return nil
}

// chain checks p itself (following links) and each directory above it.
func chain(what, p string, dir bool) error {
	st, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if dir && !st.IsDir() {
		return fmt.Errorf("%s %s: %w", what, p, syscall.ENOTDIR)
	}
	if dir && st.Mode()&fs.ModeSticky != 0 && st.Mode().Perm()&0o022 != 0 {
		return pathErr(what, p, st, "a shared directory (sticky, writable by others); use a directory of its own, such as /var/lib/fwp, $XDG_RUNTIME_DIR/fwp or ~/.local/state/fwp")
	}
	if err := own(what, p, st); err != nil {
		return err
	}
	if st.Mode().Perm()&0o022 != 0 {
		return pathErr(what, p, st, "writable by group or other; chmod go-w it")
	}
	for d := filepath.Dir(p); ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if err := own(what+"'s parent", d, st); err != nil {
			return err
		}
		if st.Mode().Perm()&0o022 != 0 && st.Mode()&fs.ModeSticky == 0 {
			return pathErr(what+"'s parent", d, st, "writable by group or other without the sticky bit, so another user can replace what it holds")
		}
		if filepath.Dir(d) == d {
			return nil
		}
	}
}

func own(what, p string, st fs.FileInfo) error {
	if uid := st.Sys().(*syscall.Stat_t).Uid; !ownedWell(uid) {
		return pathErr(what, p, st, fmt.Sprintf("owned by another user (fwpd runs as uid %d; only root or that user is trusted)", euid))
	}
	return nil
}

func pathErr(what, p string, st fs.FileInfo, reason string) error {
	return &PathError{What: what, Path: p, UID: st.Sys().(*syscall.Stat_t).Uid, Mode: st.Mode(), Reason: reason}
}
