package agent

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
)

var setupOnce sync.Mutex
var setupDone bool

func (s *server) setup(st *proto.Stream, req *proto.SetupRequest) {
	setupOnce.Lock()
	defer setupOnce.Unlock()
	res := proto.SetupResult{}
	first := !setupDone
	setupFirst = first
	if err := applySetup(req, first); err != nil {
		res.Error = err.Error()
	} else {
		setupDone = true
	}
	if !first {
		// A restored guest: clock, entropy and identity are fresh now, so
		// the workload frozen before the snapshot may run again.
		thawWorkload()
		phase("thaw")
	}
	res.Timings = map[string]int64{"setup_us": setupTook.Microseconds(), "root_us": rootTook.Microseconds(), "uptime_us": uptime().Microseconds()}
	for k, v := range phases {
		res.Timings[k] = v
	}
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult, Setup: &res}))
}

// applySetup configures the machine. first is false on a restored guest that
// is already assembled: then only identity (clock, entropy, hostname,
// network) is reset.
func applySetup(req *proto.SetupRequest, first bool) (err error) {
	t0 := time.Now()
	phaseT = t0
	defer func() { setupTook = time.Since(t0) }()
	if req.UnixNano > 0 {
		tv := unix.NsecToTimeval(req.UnixNano)
		if err := unix.Settimeofday(&tv); err != nil {
			return fmt.Errorf("set clock: %w", err)
		}
	}
	if len(req.Entropy) > 0 {
		if err := addEntropy(req.Entropy); err != nil {
			return fmt.Errorf("seed rng: %w", err)
		}
	}
	phase("clock_entropy")
	if first {
		t := time.Now()
		if err := assembleRoot(req); err != nil {
			return err
		}
		rootTook = time.Since(t)
	}
	if req.Hostname != "" {
		if err := unix.Sethostname([]byte(req.Hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
	}
	phase("root_hostname")
	if err := linkUp("lo"); err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if req.Net != nil {
		if err := configureNet(req.Net); err != nil {
			return fmt.Errorf("network: %w", err)
		}
	}
	phase("net")
	if err := writeEtc(req); err != nil {
		return err
	}
	phase("etc")
	for _, f := range req.Files {
		if !filepath.IsAbs(f.Path) {
			return fmt.Errorf("setup file %q: path must be absolute", f.Path)
		}
		os.MkdirAll(filepath.Dir(f.Path), 0o755)
		data := f.Data
		if f.Append {
			data = appendBlock(f.Path, f.Data)
		}
		if err := replaceFile(f.Path, data, os.FileMode(f.Mode&0o7777)); err != nil {
			return fmt.Errorf("setup file %s: %w", f.Path, err)
		}
	}
	return nil
}

// addEntropy mixes host randomness into the kernel pool, credits it, and
// forces a reseed of the CRNG so that forks of one snapshot diverge at once.
func addEntropy(b []byte) error {
	if len(b) > 4096 {
		b = b[:4096]
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(b)+3)
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(len(b) * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(b))
	copy(buf[8:], b)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDADDENTROPY, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.RNDRESEEDCRNG, 0); e != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", e)
	}
	return nil
}

// assembleRoot mounts the read-only image disk under a per-sandbox writable
// layer with overlayfs and makes the result the root of the filesystem.
func assembleRoot(req *proto.SetupRequest) error {
	fstype := req.RootFSType
	if fstype == "" {
		fstype = "ext4"
	}
	for _, d := range []string{"/mnt/lower", "/mnt/upper", "/newroot"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	phase("pre_mount")
	if err := unix.Mount(req.RootDevice, "/mnt/lower", fstype, unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("mount image %s: %w", req.RootDevice, err)
	}
	if req.UpperDevice != "" {
		if err := unix.Mount(req.UpperDevice, "/mnt/upper", "ext4", unix.MS_NOATIME, ""); err != nil {
			return fmt.Errorf("mount writable layer %s: %w", req.UpperDevice, err)
		}
	} else if err := unix.Mount("tmpfs", "/mnt/upper", "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs layer: %w", err)
	}
	phase("mount_disks")
	os.MkdirAll("/mnt/upper/root", 0o755)
	os.MkdirAll("/mnt/upper/work", 0o755)
	opts := "lowerdir=/mnt/lower,upperdir=/mnt/upper/root,workdir=/mnt/upper/work"
	if err := unix.Mount("overlay", "/newroot", "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay: %w", err)
	}
	// switch_root: the initramfs stays in memory under the new root; the
	// agent binary is already loaded and keeps running.
	phase("overlay")
	if err := unix.Chdir("/newroot"); err != nil {
		return err
	}
	if err := unix.Mount("/newroot", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	return mountSystem()
}

// mountSystem mounts the kernel filesystems every Linux program expects.
func mountSystem() error {
	type mnt struct {
		src, dst, fstype string
		flags            uintptr
		data             string
	}
	const nsd = unix.MS_NOSUID | unix.MS_NODEV
	for _, m := range []mnt{
		{"proc", "/proc", "proc", nsd | unix.MS_NOEXEC, ""},
		{"sysfs", "/sys", "sysfs", nsd | unix.MS_NOEXEC, ""},
		{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
		{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"},
		{"shm", "/dev/shm", "tmpfs", nsd, "mode=1777"},
		{"tmpfs", "/run", "tmpfs", nsd, "mode=0755"},
		{"tmpfs", "/tmp", "tmpfs", nsd, "mode=1777"},
		{"cgroup2", "/sys/fs/cgroup", "cgroup2", nsd | unix.MS_NOEXEC, ""},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", m.dst, err)
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	os.Remove("/dev/ptmx")
	if err := os.Symlink("pts/ptmx", "/dev/ptmx"); err != nil {
		return fmt.Errorf("/dev/ptmx: %w", err)
	}
	for _, l := range [][2]string{{"/proc/self/fd", "/dev/fd"}, {"/proc/self/fd/0", "/dev/stdin"}, {"/proc/self/fd/1", "/dev/stdout"}, {"/proc/self/fd/2", "/dev/stderr"}} {
		os.Symlink(l[0], l[1])
	}
	return nil
}

func writeEtc(req *proto.SetupRequest) error {
	if _, err := os.Stat("/etc"); errors.Is(err, os.ErrNotExist) {
		os.MkdirAll("/etc", 0o755)
	}
	host := req.Hostname
	if host == "" {
		host = "matchlock"
	}
	if err := replaceFile("/etc/hostname", []byte(host+"\n"), 0o644); err != nil {
		return fmt.Errorf("/etc/hostname: %w", err)
	}
	hosts := "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t" + host + "\n"
	if err := replaceFile("/etc/hosts", []byte(hosts), 0o644); err != nil {
		return fmt.Errorf("/etc/hosts: %w", err)
	}
	var resolv strings.Builder
	if req.Net != nil && req.Net.DNS != "" {
		fmt.Fprintf(&resolv, "nameserver %s\noptions ndots:0 timeout:2 attempts:2\n", req.Net.DNS)
	}
	if err := replaceFile("/etc/resolv.conf", []byte(resolv.String()), 0o644); err != nil {
		return fmt.Errorf("/etc/resolv.conf: %w", err)
	}
	return nil
}

// replaceFile writes a file, replacing a symlink at path rather than
// following it (images often link /etc/resolv.conf elsewhere).
func replaceFile(path string, data []byte, mode os.FileMode) error {
	fi, err := os.Lstat(path)
	if err == nil && fi.Mode()&os.ModeSymlink != 0 {
		os.Remove(path)
	}
	if err == nil && fi.Mode().IsRegular() && !setupFirst {
		// A restored guest, its workload frozen: nobody can see a
		// half-written file, and rewriting in place (or not at all) is
		// cheaper than a new file and a rename.
		if old, err := os.ReadFile(path); err == nil && string(old) == string(data) {
			return nil
		}
		if f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0); err == nil {
			_, err = f.Write(data)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			return err
		}
	}
	tmp := path + ".matchlock-tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Timings of the last setup, reported to the host for tracing.
var setupTook, rootTook time.Duration

// phases records fine-grained setup timings (µs) for MATCHLOCK_TRACE.
var phases = map[string]int64{}
var phaseT = time.Now()

func phase(name string) {
	now := time.Now()
	phases[name] = now.Sub(phaseT).Microseconds()
	phaseT = now
}

func uptime() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts)
	return time.Duration(ts.Nano())
}

// setupFirst is false while a restored guest's identity is applied.
var setupFirst = true

// appendBlock returns path's content (through a symlink; missing: empty)
// with block after it, a previous copy of block (from its first line on)
// dropped.
func appendBlock(path string, block []byte) []byte {
	old, _ := os.ReadFile(path)
	marker := block
	if i := bytes.IndexByte(block, '\n'); i >= 0 {
		marker = block[:i+1]
	}
	if i := bytes.Index(old, marker); len(marker) > 1 && i >= 0 && (i == 0 || old[i-1] == '\n') {
		old = old[:i]
	}
	if len(old) > 0 && old[len(old)-1] != '\n' {
		old = append(old, '\n')
	}
	return append(old, block...)
}
