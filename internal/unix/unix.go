//go:build linux

package unix

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"unsafe"

	xunix "golang.org/x/sys/unix"
)

// Errno values the datapath and its tests compare with.
const (
	EPERM        = xunix.EPERM
	ECONNREFUSED = xunix.ECONNREFUSED
	ENOENT       = xunix.ENOENT
)

// BPFStatsRunTime is BPF_STATS_RUN_TIME, for ebpf.EnableStats.
const BPFStatsRunTime = uint32(xunix.BPF_STATS_RUN_TIME)

// SocketCookie returns the kernel's cookie of a socket (SO_COOKIE), the key
// the eBPF hooks use for per-socket state.
func SocketCookie(fd int) (uint64, error) {
	var c uint64
	l := uint32(8)
	if err := getsockopt(fd, xunix.SOL_SOCKET, xunix.SO_COOKIE, unsafe.Pointer(&c), &l); err != nil {
		return 0, fmt.Errorf("getsockopt SO_COOKIE: %w", err)
	}
	return c, nil
}

// OriginalDst answers getsockopt(SOL_IP, SO_ORIGINAL_DST), or the IPv6 one
// when v6, as a transparent proxy written for iptables REDIRECT asks it.
func OriginalDst(fd int, v6 bool) (netip.AddrPort, error) {
	var buf [28]byte
	l := uint32(16)
	level := xunix.SOL_IP
	if v6 {
		l, level = 28, xunix.SOL_IPV6
	}
	if err := getsockopt(fd, level, 80, unsafe.Pointer(&buf[0]), &l); err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", err)
	}
	port := binary.BigEndian.Uint16(buf[2:4])
	switch fam := binary.NativeEndian.Uint16(buf[0:2]); {
	case fam == xunix.AF_INET && l >= 8:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	case fam == xunix.AF_INET6 && l >= 24:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port), nil
	}
	return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: unexpected answer of %d bytes", l)
}

func getsockopt(fd, level, opt int, p unsafe.Pointer, l *uint32) error {
	_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(l)), 0)
	if e != 0 {
		return e
	}
	return nil
}

// SetLinkUp brings a network interface up (e.g. lo in a new namespace).
func SetLinkUp(name string) error {
	fd, err := xunix.Socket(xunix.AF_INET, xunix.SOCK_DGRAM|xunix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer xunix.Close(fd)
	ifr, err := xunix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := xunix.IoctlIfreq(fd, xunix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("SIOCGIFFLAGS %s: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | xunix.IFF_UP)
	if err := xunix.IoctlIfreq(fd, xunix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("SIOCSIFFLAGS %s: %w", name, err)
	}
	return nil
}

// CgroupID returns the id of a cgroup v2 directory (its inode number), the
// value bpf_get_current_cgroup_id reports for tasks in it.
func CgroupID(path string) (uint64, error) {
	var st xunix.Stat_t
	if err := xunix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Ino, nil
}

// MountCgroup2 mounts a cgroup v2 hierarchy at dir.
func MountCgroup2(dir string) error {
	return os.NewSyscallError("mount", xunix.Mount("cgroup2", dir, "cgroup2", 0, ""))
}

// MountBPF mounts a bpffs at dir.
func MountBPF(dir string) error {
	return os.NewSyscallError("mount", xunix.Mount("bpf", dir, "bpf", 0, ""))
}

// Unmount detaches the file system at dir.
func Unmount(dir string) error {
	return os.NewSyscallError("umount", xunix.Unmount(dir, xunix.MNT_DETACH))
}

// MonotonicSeconds is CLOCK_MONOTONIC in whole seconds, the clock of
// bpf_ktime_get_ns.
func MonotonicSeconds() (uint32, error) {
	var ts xunix.Timespec
	if err := xunix.ClockGettime(xunix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, err
	}
	return uint32(ts.Sec), nil
}

// Geteuid is the effective user id.
func Geteuid() int { return xunix.Geteuid() }

// IsBPFFS reports whether dir is on a bpffs.
func IsBPFFS(dir string) (bool, error) {
	var st xunix.Statfs_t
	if err := xunix.Statfs(dir, &st); err != nil {
		return false, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return uint32(st.Type) == xunix.BPF_FS_MAGIC, nil
}

// CgroupVersion says which cgroup hierarchy dir is on: 2, 1, or 0 when it
// is not on a cgroup file system at all.
func CgroupVersion(dir string) (int, error) {
	var st xunix.Statfs_t
	if err := xunix.Statfs(dir, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	switch uint32(st.Type) {
	case xunix.CGROUP2_SUPER_MAGIC:
		return 2, nil
	case xunix.CGROUP_SUPER_MAGIC:
		return 1, nil
	}
	return 0, nil
}

// FindCgroup2 returns the first cgroup2 mount point in /proc/mounts.
func FindCgroup2() (string, error) {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		fs := strings.Fields(line)
		if len(fs) >= 3 && fs[2] == "cgroup2" {
			return fs[1], nil
		}
	}
	return "", errors.New("no cgroup2 file system in /proc/mounts")
}

// SocketState describes a socket for fwpd checking one a proxy passed:
// its address family and type, and whether it is already connected.
func SocketState(fd int) (family, sotype int, connected bool, err error) {
	if family, err = xunix.GetsockoptInt(fd, xunix.SOL_SOCKET, xunix.SO_DOMAIN); err != nil {
		return 0, 0, false, fmt.Errorf("getsockopt SO_DOMAIN: %w", err)
	}
	if sotype, err = xunix.GetsockoptInt(fd, xunix.SOL_SOCKET, xunix.SO_TYPE); err != nil {
		return 0, 0, false, fmt.Errorf("getsockopt SO_TYPE: %w", err)
	}
	_, perr := xunix.Getpeername(fd)
	return family, sotype, perr == nil, nil
}
