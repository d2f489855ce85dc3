package agent

import (
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/guest/proto/fsproto"
)

// defaultCacheTTL is how long the guest kernel trusts a name or attributes
// of a shared directory before asking the host again: changes made on the
// host are seen after at most this long.
const defaultCacheTTL = time.Second

// mount serves a KindMount stream: it mounts req.Target and answers, and
// for a FUSE share keeps serving the filesystem until the stream ends.
func mount(st *proto.Stream, req *proto.MountRequest) {
	target := filepath.Clean(req.Target)
	if !filepath.IsAbs(target) || target == "/" {
		sendError(st, proto.ErrCodeInvalid, fmt.Errorf("mount %q: want an absolute path other than /", req.Target))
		return
	}
	var err error
	switch req.Type {
	case "ext4", "9p":
		err = mountDevice(req, target)
	case "fuse":
		err = mountShare(st, req, target)
		if err == nil {
			return
		}
	default:
		err = fmt.Errorf("mount %s: unknown type %q", target, req.Type)
	}
	if err != nil {
		sendError(st, proto.ErrCodeInternal, err)
		return
	}
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult}))
}

// mountDevice mounts a volume (ext4 block device) or a virtio-9p share.
func mountDevice(req *proto.MountRequest, target string) error {
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("mount %s: %w", target, err)
	}
	var flags uintptr = unix.MS_NODEV
	if req.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	data := req.Options
	if req.Type == "9p" {
		data = strings.TrimSuffix("trans=virtio,version=9p2000.L,"+data, ",")
	} else if !strings.HasPrefix(req.Source, "/dev/") {
		return fmt.Errorf("mount %s: source %q is not a device", target, req.Source)
	}
	if err := unix.Mount(req.Source, target, req.Type, flags, data); err != nil {
		if req.Type == "ext4" && req.ReadOnly && errors.Is(err, unix.EROFS) {
			return fmt.Errorf("mount %s on %s: the volume needs journal recovery (its last sandbox was killed): attach it read-write once", req.Source, target)
		}
		return fmt.Errorf("mount %s on %s: %w", req.Source, target, err)
	}
	if req.Type == "ext4" && !req.ReadOnly {
		volumesMu.Lock()
		volumes = append(volumes, target)
		volumesMu.Unlock()
	}
	return nil
}

// fifreeze is FIFREEZE, _IOWR('X', 119, int) (x/sys/unix lacks it).
const fifreeze = 0xc0045877

// volumes are the writable volume mounts, frozen at power-off.
var (
	volumesMu sync.Mutex
	volumes   []string
)

// freezeVolumes flushes each writable volume's journal and marks it clean
// on disk (FIFREEZE), so the next sandbox mounts it without recovery, even
// read-only, whatever files are still open. The VM is about to end: the
// volumes are never thawed.
func freezeVolumes() {
	volumesMu.Lock()
	defer volumesMu.Unlock()
	for _, v := range volumes {
		if fd, err := unix.Open(v, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
			unix.IoctlSetInt(fd, fifreeze, 0)
			unix.Close(fd)
		}
	}
	volumes = nil
}

var shareSeq atomic.Int32

// logger receives go-fuse's own complaints (on the console).
var logger = log.New(os.Stderr, "matchlock-guest: fuse: ", 0)

// mountShare mounts a FUSE filesystem served by the host over st at
// target: directly (read-write or read-only), or as the read-only lower
// layer of an overlay whose upper layer lives on the sandbox's disk.
func mountShare(st *proto.Stream, req *proto.MountRequest, target string) error {
	id, err := resolveUser(req.Owner, "/etc/passwd", "/etc/group")
	if err != nil {
		return fmt.Errorf("mount %s: owner: %w", target, err)
	}
	ttl := defaultCacheTTL
	if req.CacheMillis > 0 {
		ttl = time.Duration(req.CacheMillis) * time.Millisecond
	}
	n := shareSeq.Add(1)
	mnt := target
	var upper, work string
	if req.Overlay {
		base := fmt.Sprintf("/run/matchlock/ws/%d", n)
		mnt = base + "/lower"
		layer, err := overlayLayer(req.UpperDevice, base)
		if err != nil {
			return fmt.Errorf("mount %s: %w", target, err)
		}
		upper, work = layer+"/upper", layer+"/work"
		for _, d := range []string{upper, work} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return fmt.Errorf("mount %s: %w", target, err)
			}
		}
	}
	for _, d := range []string{mnt, target} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("mount %s: %w", target, err)
		}
	}
	var flags uintptr = unix.MS_NOSUID | unix.MS_NODEV
	if req.ReadOnly || req.Overlay {
		flags |= unix.MS_RDONLY
	}
	var win *memWindow
	if req.WindowSize > 0 {
		win = offerWindow(st, req.WindowSize) // nil: reads go over the stream
	}
	c := newFSClient(st, id.UID, id.GID, ttl, win)
	source := "matchlock"
	if req.Source != "" {
		source = "matchlock:" + strings.Map(func(r rune) rune {
			if r == ',' || r == ' ' || r < 0x20 {
				return '_'
			}
			return r
		}, req.Source)
	}
	srv, err := fuse.NewServer(c, mnt, &fuse.MountOptions{
		AllowOther:        true,
		DirectMountStrict: true,
		DirectMountFlags:  flags,
		FsName:            source,
		Name:              "matchlock",
		// The guest kernel checks permissions against the attributes (with
		// the mount's owner); the host only enforces containment and ro.
		Options:              []string{"default_permissions"},
		MaxWrite:             fsproto.MaxIO,
		MaxBackground:        64,
		IgnoreSecurityLabels: true, // no getxattr round trip per write
		DisableSplice:        true,
		// Not CAP_ATOMIC_O_TRUNC: without OPEN requests (see fsClient.Open)
		// the kernel must send O_TRUNC as a SETATTR.
		ExtraCapabilities: fuse.CAP_READDIRPLUS_AUTO,
		Logger:            logger,
	})
	if err != nil {
		c.fail(errors.New("mount failed"))
		return fmt.Errorf("mount %s: fuse: %w", mnt, err)
	}
	go c.sendInvals(srv)
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		return fmt.Errorf("mount %s: fuse: %w", mnt, err)
	}
	raiseReadahead(mnt)
	if req.Overlay {
		// index=on: a hardlink made to a host file keeps one inode (number
		// and device) under both names once copied up; without it the two
		// names report different inodes and git clone refuses the result.
		opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s,index=on", mnt, upper, work)
		if err := unix.Mount("overlay", target, "overlay", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
			srv.Unmount()
			return fmt.Errorf("mount overlay on %s: %w", target, err)
		}
	}
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult}))
	// The mount lives as long as the stream; after it ends (the host went
	// away) requests fail with EIO, and the mount stays so that nothing
	// appears in its place.
	<-st.Done()
	return nil
}

// raiseReadahead lets the kernel read ahead up to one full request
// (fsproto.MaxIO) on the FUSE mount: its default of 128 KiB halves
// sequential read throughput over the control channel.
func raiseReadahead(mnt string) {
	var stt unix.Stat_t
	if unix.Stat(mnt, &stt) != nil {
		return
	}
	bdi := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(stt.Dev), unix.Minor(stt.Dev))
	os.WriteFile(bdi, []byte(strconv.Itoa(fsproto.MaxIO>>10)), 0)
}

var (
	diskOnce sync.Once
	diskErr  error
)

// diskMount is where the sandbox's writable disk is mounted a second time
// (the root overlay's copy is not reachable after the chroot), to hold
// the upper layers of overlay shares.
const diskMount = "/run/matchlock/disk"

// overlayLayer returns a directory for one overlay share's upper and work
// directories: on the sandbox's writable disk, or on a tmpfs without one.
func overlayLayer(device, base string) (string, error) {
	if device == "" {
		dir := base + "/rw"
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0755"); err != nil {
			return "", fmt.Errorf("tmpfs for overlay: %w", err)
		}
		return dir, nil
	}
	diskOnce.Do(func() {
		if diskErr = os.MkdirAll(diskMount, 0o700); diskErr != nil {
			return
		}
		if err := unix.Mount(device, diskMount, "ext4", unix.MS_NOATIME|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
			diskErr = fmt.Errorf("mount %s for overlay: %w", device, err)
		}
	})
	if diskErr != nil {
		return "", diskErr
	}
	return diskMount + "/shares/" + filepath.Base(base), nil
}
