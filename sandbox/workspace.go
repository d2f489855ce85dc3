package sandbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/guest/proto/fsproto"
	"matchlock.dev/matchlock/vmm"
	"matchlock.dev/matchlock/workspace"
)

// Mount modes.
const (
	MountReadWrite = "rw"      // guest writes go to the host directory
	MountReadOnly  = "ro"      // refused on the host (EROFS), not only by the guest
	MountOverlay   = "overlay" // guest writes go to a copy-on-write layer in the sandbox; the host directory is untouched
)

// Mount shares a host directory with the guest (see package workspace and
// docs/workspace.md).
type Mount struct {
	Source string `json:"source"`         // host directory
	Target string `json:"target"`         // absolute path in the guest
	Mode   string `json:"mode,omitempty"` // MountReadWrite (default), MountReadOnly or MountOverlay
	// Owner is who the host's files appear owned by in the guest: "uid",
	// "uid:gid" or a user[:group] of the image. Default: the image's USER,
	// else root. Changing a file's owner to anyone else fails with EPERM.
	Owner string `json:"owner,omitempty"`
	// CacheTTL is how long the guest trusts names and attributes before
	// asking the host again, so how late it sees changes made on the host.
	// Default 1 s.
	CacheTTL time.Duration `json:"cache_ttl,omitempty"`
	// Transport "9p" exports the directory with the VMM's virtio-9p
	// instead, for comparisons: none of package workspace's containment
	// or limits apply then, only QEMU's. Overlay is not available with it.
	Transport string `json:"transport,omitempty"`
}

// VolumeMount attaches a named volume (package workspace) as a disk.
type VolumeMount struct {
	Name     string `json:"name"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"read_only,omitempty"`
}

// DiskMount attaches an ext4 disk image file at Target (see Options.Disks).
type DiskMount struct {
	Path   string `json:"path"`
	Target string `json:"target"`
}

// maxVolumes bounds the extra disks of one sandbox.
const maxVolumes = 8

// ParseMountFlag parses the CLI's -v value:
//
//	HOST_DIR:GUEST_PATH[:OPTIONS]   OPTIONS: comma-separated rw, ro, overlay, uid=N, gid=N
//	@NAME:GUEST_PATH[:ro]           a named volume
//
// Exactly one of the results is non-nil when err is nil.
func ParseMountFlag(v string) (*Mount, *VolumeMount, error) {
	src, rest, ok := strings.Cut(v, ":")
	if !ok || src == "" || rest == "" {
		return nil, nil, fmt.Errorf("-v %q: want HOST_DIR:GUEST_PATH[:ro|:overlay] or @VOLUME:GUEST_PATH[:ro]", v)
	}
	target, opts, _ := strings.Cut(rest, ":")
	if name, isVol := strings.CutPrefix(src, "@"); isVol {
		vm := &VolumeMount{Name: name, Target: target}
		switch opts {
		case "", MountReadWrite:
		case MountReadOnly:
			vm.ReadOnly = true
		default:
			return nil, nil, fmt.Errorf("-v %q: a volume takes only :ro or :rw", v)
		}
		return nil, vm, nil
	}
	m := &Mount{Source: src, Target: target}
	var uid, gid string
	for _, o := range strings.Split(opts, ",") {
		switch {
		case o == "":
		case o == MountReadWrite || o == MountReadOnly || o == MountOverlay:
			if m.Mode != "" && m.Mode != o {
				return nil, nil, fmt.Errorf("-v %q: %s and %s are exclusive", v, m.Mode, o)
			}
			m.Mode = o
		case strings.HasPrefix(o, "uid="):
			uid = strings.TrimPrefix(o, "uid=")
		case strings.HasPrefix(o, "gid="):
			gid = strings.TrimPrefix(o, "gid=")
		default:
			return nil, nil, fmt.Errorf("-v %q: unknown option %q (want ro, rw, overlay, uid=N, gid=N)", v, o)
		}
	}
	for _, id := range []string{uid, gid} {
		if _, err := strconv.ParseUint(id, 10, 32); id != "" && err != nil {
			return nil, nil, fmt.Errorf("-v %q: uid and gid must be numbers", v)
		}
	}
	switch {
	case uid != "" && gid != "":
		m.Owner = uid + ":" + gid
	case uid != "":
		m.Owner = uid
	case gid != "":
		m.Owner = "0:" + gid
	}
	return m, nil, nil
}

// mountState is a sandbox's shares and volumes.
//
// Locking: mu guards everything after it; the plan is written before the
// VM starts and read-only afterwards.
type mountState struct {
	plan   []plannedMount
	notice func(string)
	disks  bool // Options.Disks attached: sync them out on Stop as volumes are

	windows int // FUSE shares that get a read window

	mu      sync.Mutex
	vols    []*workspace.Attachment
	servers []*workspace.Server
	mapped  [][]byte // read windows mapped from guest RAM
	cancel  context.CancelFunc
	serving sync.WaitGroup
}

// Read windows (see fsproto.FlagWindow): each FUSE share is offered
// windowSize bytes of guest memory, one fsproto.MaxIO slot per read the
// host runs at once, for at most maxWindows shares and no more than a
// sixteenth of the guest's RAM in all (later shares read over the
// stream).
const (
	windowSize = workspace.DefaultMaxBulkInFlight * fsproto.MaxIO
	maxWindows = 8
)

type plannedMount struct {
	req proto.MountRequest
	dir string // fuse: the host directory
}

func checkTarget(t string) (string, error) {
	c := filepath.Clean(t)
	if !filepath.IsAbs(t) || c == "/" {
		return "", fmt.Errorf("mount target %q: want an absolute guest path other than /", t)
	}
	for _, sys := range []string{"/proc", "/sys", "/dev"} {
		if c == sys || strings.HasPrefix(c, sys+"/") {
			return "", fmt.Errorf("mount target %q: %s is the kernel's", t, sys)
		}
	}
	return c, nil
}

// prepareMounts validates the options' mounts, locks the volumes and
// returns the extra disks and VMM shares. Disk i of the result is
// /dev/vd(firstDisk+i) in the guest.
func (s *Sandbox) prepareMounts(opts *Options, firstDisk int) ([]vmm.Disk, []vmm.Share, error) {
	if len(opts.Volumes)+len(opts.Disks) > maxVolumes {
		return nil, nil, fmt.Errorf("%d volumes and disks: at most %d", len(opts.Volumes)+len(opts.Disks), maxVolumes)
	}
	seen := map[string]bool{}
	var disks []vmm.Disk
	var shares []vmm.Share
	owner := s.Image.User
	s.mnt.notice = opts.Notice
	for _, m := range opts.Mounts {
		target, err := checkTarget(m.Target)
		if err != nil {
			return nil, nil, err
		}
		if seen[target] {
			return nil, nil, fmt.Errorf("two mounts on %s", target)
		}
		seen[target] = true
		dir, err := filepath.Abs(m.Source)
		if err != nil {
			return nil, nil, err
		}
		if fi, err := os.Stat(dir); err != nil {
			return nil, nil, fmt.Errorf("mount %s: %w", m.Source, err)
		} else if !fi.IsDir() {
			return nil, nil, fmt.Errorf("mount %s: not a directory", m.Source)
		}
		req := proto.MountRequest{Type: "fuse", Source: filepath.Base(dir), Target: target, Owner: m.Owner,
			CacheMillis: int(m.CacheTTL.Milliseconds())}
		if req.Owner == "" {
			req.Owner = owner
		}
		switch m.Mode {
		case "", MountReadWrite:
		case MountReadOnly:
			req.ReadOnly = true
		case MountOverlay:
			req.Overlay, req.UpperDevice = true, "/dev/vdb"
		default:
			return nil, nil, fmt.Errorf("mount %s: mode %q: want rw, ro or overlay", m.Source, m.Mode)
		}
		switch m.Transport {
		case "", "fuse":
		case "9p":
			if req.Overlay {
				return nil, nil, fmt.Errorf("mount %s: overlay is not available over 9p", m.Source)
			}
			tag := fmt.Sprintf("ml9p%d", len(shares))
			shares = append(shares, vmm.Share{Tag: tag, Path: dir, ReadOnly: req.ReadOnly})
			req = proto.MountRequest{Type: "9p", Source: tag, Target: target, ReadOnly: req.ReadOnly,
				Options: "cache=loose,msize=262144"}
		default:
			return nil, nil, fmt.Errorf("mount %s: transport %q: want fuse or 9p", m.Source, m.Transport)
		}
		s.mnt.plan = append(s.mnt.plan, plannedMount{req: req, dir: dir})
	}
	for i, v := range opts.Volumes {
		target, err := checkTarget(v.Target)
		if err != nil {
			return nil, nil, err
		}
		if seen[target] {
			return nil, nil, fmt.Errorf("two mounts on %s", target)
		}
		seen[target] = true
		a, err := workspace.AttachVolume(v.Name)
		if err != nil {
			return nil, nil, err
		}
		s.mnt.mu.Lock()
		s.mnt.vols = append(s.mnt.vols, a)
		s.mnt.mu.Unlock()
		disks = append(disks, vmm.Disk{Path: a.Path, ReadOnly: v.ReadOnly})
		dev := fmt.Sprintf("/dev/vd%c", 'a'+firstDisk+i)
		s.mnt.plan = append(s.mnt.plan, plannedMount{req: proto.MountRequest{Type: "ext4", Source: dev, Target: target, ReadOnly: v.ReadOnly}})
	}
	for i, d := range opts.Disks {
		target, err := checkTarget(d.Target)
		if err != nil {
			return nil, nil, err
		}
		if seen[target] {
			return nil, nil, fmt.Errorf("two mounts on %s", target)
		}
		seen[target] = true
		disks = append(disks, vmm.Disk{Path: d.Path})
		s.mnt.disks = true
		dev := fmt.Sprintf("/dev/vd%c", 'a'+firstDisk+len(opts.Volumes)+i)
		s.mnt.plan = append(s.mnt.plan, plannedMount{req: proto.MountRequest{Type: "ext4", Source: dev, Target: target}})
	}
	s.mnt.windows = min(maxWindows, opts.MemoryMiB<<20/16/windowSize)
	// Parents before children, so that nested targets stack.
	sort.SliceStable(s.mnt.plan, func(i, j int) bool {
		return strings.Count(s.mnt.plan[i].req.Target, "/") < strings.Count(s.mnt.plan[j].req.Target, "/")
	})
	return disks, shares, nil
}

// startMounts mounts everything planned, in order, once the root is
// assembled; FUSE shares get a workspace.Server serving their stream
// until the sandbox stops.
func (s *Sandbox) startMounts(ctx context.Context) error {
	if len(s.mnt.plan) == 0 {
		return nil
	}
	s.mnt.mu.Lock()
	serveCtx, cancel := context.WithCancel(context.Background())
	s.mnt.cancel = cancel
	s.mnt.mu.Unlock()
	_, canMap := s.machine.(vmm.GuestMemory)
	windows := 0
	for _, p := range s.mnt.plan {
		req := p.req
		if req.Type != "fuse" {
			if _, err := s.call(ctx, proto.OpenHeader{Kind: proto.KindMount, Mount: &req}); err != nil {
				return fmt.Errorf("mount %s: %w", req.Target, err)
			}
			continue
		}
		if canMap && windows < s.mnt.windows {
			req.WindowSize = windowSize
			windows++
		}
		srv, err := workspace.New(workspace.Config{Dir: p.dir, ReadOnly: req.ReadOnly || req.Overlay})
		if err != nil {
			return err
		}
		st, err := s.OpenStream(ctx, proto.Encode(proto.OpenHeader{Kind: proto.KindMount, Mount: &req}))
		if err != nil {
			srv.Close()
			return fmt.Errorf("mount %s: %w", req.Target, err)
		}
		s.mnt.mu.Lock()
		s.mnt.servers = append(s.mnt.servers, srv)
		s.mnt.serving.Add(1)
		s.mnt.mu.Unlock()
		go func() {
			defer s.mnt.serving.Done()
			// Only a guest breaking the protocol is news; the stream ends
			// with the sandbox otherwise.
			if err := srv.Serve(serveCtx, st); errors.Is(err, workspace.ErrMalformed) && s.mnt.notice != nil {
				s.mnt.notice(fmt.Sprintf("share %s: %v", req.Target, err))
			}
		}()
		if err := s.awaitMount(ctx, st, srv, req.WindowSize); err != nil {
			return fmt.Errorf("mount %s on %s: %w", p.dir, req.Target, err)
		}
	}
	return nil
}

// awaitMount waits for the guest to report a share mounted, first
// answering its read window (if it was offered one).
func (s *Sandbox) awaitMount(ctx context.Context, st *proto.Stream, srv *workspace.Server, windowSize uint64) error {
	_, err := recvResultWith(ctx, st, func(m *proto.StreamMsg) error {
		if m.Type != proto.MsgWindow {
			return nil
		}
		if windowSize == 0 || m.Window == nil {
			if m.Error != "" && s.mnt.notice != nil {
				s.mnt.notice("share reads over the control channel: guest: " + m.Error)
			}
			return nil
		}
		size := windowSize
		windowSize = 0 // one offer, one answer
		mem, err := mapWindow(s.machine.(vmm.GuestMemory), m.Window, size)
		answer := proto.StreamMsg{Type: proto.MsgWindow}
		if err != nil {
			answer.Error = err.Error()
			if s.mnt.notice != nil {
				s.mnt.notice("share reads over the control channel: " + err.Error())
			}
		} else {
			s.mnt.mu.Lock()
			s.mnt.mapped = append(s.mnt.mapped, mem)
			s.mnt.mu.Unlock()
			srv.SetWindow(mem)
		}
		return st.SendMsg(proto.Encode(answer))
	})
	return err
}

// mapWindow maps the pages of a read window the guest names (size bytes,
// see proto.WindowPages) and checks that each holds the guest's stamp, so
// that a page mapped wrongly can never receive file data.
func mapWindow(gm vmm.GuestMemory, p *proto.WindowPages, size uint64) ([]byte, error) {
	page := uint64(os.Getpagesize())
	if uint64(len(p.Frames)) != size/page*8 {
		return nil, fmt.Errorf("read window: %d frame bytes for %d bytes", len(p.Frames), size)
	}
	var ranges []vmm.MemRange
	for i := 0; i < len(p.Frames); i += 8 {
		pfn := binary.BigEndian.Uint64(p.Frames[i:])
		if pfn > 1<<40 {
			return nil, fmt.Errorf("read window: frame %#x", pfn)
		}
		addr := pfn * page
		if n := len(ranges); n > 0 && ranges[n-1].Addr+ranges[n-1].Size == addr {
			ranges[n-1].Size += page
			continue
		}
		ranges = append(ranges, vmm.MemRange{Addr: addr, Size: page})
	}
	mem, err := gm.MapGuest(ranges)
	if err != nil {
		return nil, fmt.Errorf("read window: %w", err)
	}
	if uint64(len(mem)) != size {
		unix.Munmap(mem)
		return nil, fmt.Errorf("read window: mapped %d bytes for %d", len(mem), size)
	}
	for i := uint64(0); i < size/page; i++ {
		if binary.LittleEndian.Uint64(mem[i*page:]) != p.Nonce+i {
			unix.Munmap(mem)
			return nil, fmt.Errorf("read window: page %d is not the one the guest named", i)
		}
	}
	return mem, nil
}

// syncVolumes has a guest with volumes write everything out and power off
// before the VM is killed: a volume's data outlives the sandbox, and the
// guest's page cache would otherwise die with it.
func (s *Sandbox) syncVolumes() {
	s.mnt.mu.Lock()
	n := len(s.mnt.vols)
	s.mnt.mu.Unlock()
	if n == 0 && !s.mnt.disks || s.machine == nil || s.Conn() == nil {
		return
	}
	select {
	case <-machineDone(s.machine):
		return
	default:
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := s.call(ctx, proto.OpenHeader{Kind: proto.KindShutdown}); err != nil {
		return
	}
	select { // the agent syncs, then reboots, which ends QEMU
	case <-machineDone(s.machine):
	case <-ctx.Done():
	}
}

// releaseMounts stops serving shares and unlocks volumes; the VM is gone.
func (s *Sandbox) releaseMounts() {
	s.mnt.mu.Lock()
	cancel := s.mnt.cancel
	s.mnt.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	s.mnt.serving.Wait()
	s.mnt.mu.Lock()
	defer s.mnt.mu.Unlock()
	for _, srv := range s.mnt.servers {
		srv.Close()
	}
	for _, a := range s.mnt.vols {
		a.Release()
	}
	for _, mem := range s.mnt.mapped {
		unix.Munmap(mem) // the servers are done with it (serving.Wait above)
	}
	s.mnt.servers, s.mnt.vols, s.mnt.mapped = nil, nil, nil
}
