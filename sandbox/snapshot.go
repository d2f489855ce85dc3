package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/internal/initramfs"
	"matchlock.dev/matchlock/internal/paths"
	"matchlock.dev/matchlock/kernel"
	"matchlock.dev/matchlock/snapshot/sparse"
	"matchlock.dev/matchlock/vmm"
	"matchlock.dev/matchlock/vmm/qemu"
)

// A snapshot of a sandbox is a directory holding what the VMM wrote (RAM,
// device state: see vmm.Snapshotter) plus a copy of the writable layer
// (SnapshotLayerFile) and SnapshotInfoFile. The read-only image disk is
// referenced by path, not copied.
//
// Taking one: the sandbox must have no stream in flight (exec, file
// transfer): Snapshot refuses with ErrBusy rather than lose or duplicate a
// byte. Then the control connection is handed off (proto.KindHandoff: the
// guest freezes the workload and both sides stop at an agreed frame), the
// VM is paused, written, its layer copied, resumed, and a new connection is
// made over the same control socket; the guest then thaws.
//
// Restoring (Options.RestoreFrom): a new VM is started from the directory
// with its own copy of the layer, a new control socketpair and, unless the
// snapshot had none, a new NIC and network stack (policy, secrets). The
// restored agent waits for a Hello; the host connects and sends setup,
// which on an assembled guest sets only the identity: wall clock, kernel
// RNG reseed, hostname, MAC and address. The guest's frozen processes
// thaw after it, so no workload code runs with the snapshot's clock or RNG
// state.

// Files of a sandbox snapshot directory, besides the VMM's.
const (
	SnapshotInfoFile  = "sandbox.json"
	SnapshotLayerFile = "upper.ext4"
)

// ErrBusy is returned by Snapshot while streams are in flight.
var ErrBusy = errors.New("sandbox busy")

// SnapshotInfo describes a snapshot (SnapshotInfoFile).
type SnapshotInfo struct {
	Format      int         `json:"format"`
	Source      string      `json:"source"` // id of the snapshotted sandbox
	Image       string      `json:"image"`
	Rootfs      string      `json:"rootfs"` // the read-only image disk, shared
	ImageConfig ImageConfig `json:"image_config"`
	CPUs        int         `json:"cpus"`
	MemoryMiB   int         `json:"memory_mib"`
	DiskSizeMiB int         `json:"disk_size_mib"`
	Accel       string      `json:"accel"`
	Network     bool        `json:"network"`
	Created     time.Time   `json:"created"`
	// Paused is how long the source VM was paused.
	Paused time.Duration `json:"paused_ns"`
}

const snapshotFormat = 1

// snapState is a sandbox's snapshot support.
//
// Locking: gate guards Sandbox.conn and link. Opening a stream holds it
// for reading (OpenStream); a snapshot holds it for writing, so no stream
// opens while the connection is handed over. Streams already open do not
// hold it: Snapshot refuses while there are any.
type snapState struct {
	gate sync.RWMutex
	link *proto.Link // the Link of Sandbox.conn over the machine's control socket

	opts   Options // as created, for the snapshot's description
	rootfs string
	image  ImageConfig // the image's config, before secret placeholders
}

func (st *snapState) record(opts Options, rootfs string, img ImageConfig) {
	st.opts, st.rootfs, st.image = opts, rootfs, img
}

// newLink wraps the control socket so that a Conn can be replaced without
// closing it.
func (st *snapState) newLink(c net.Conn) io.ReadWriteCloser {
	st.link = proto.NewLink(c)
	return st.link
}

// OpenStream opens a stream on the guest connection. Every request goes
// through here, so that none starts while a snapshot hands the connection
// over.
func (s *Sandbox) OpenStream(ctx context.Context, header []byte) (*proto.Stream, error) {
	s.snap.gate.RLock()
	defer s.snap.gate.RUnlock()
	return s.conn.Open(ctx, header)
}

// ReadSnapshotInfo reads the description of the snapshot in dir.
func ReadSnapshotInfo(dir string) (*SnapshotInfo, error) {
	b, err := os.ReadFile(filepath.Join(dir, SnapshotInfoFile))
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	var info SnapshotInfo
	if err := json.Unmarshal(b, &info); err != nil {
		return nil, fmt.Errorf("snapshot %s: %w", SnapshotInfoFile, err)
	}
	if info.Format != snapshotFormat {
		return nil, fmt.Errorf("snapshot: unknown format %d", info.Format)
	}
	return &info, nil
}

// idleWait is how long Snapshot waits for streams that are closing.
const idleWait = 500 * time.Millisecond

// Snapshot writes a snapshot of the running sandbox into dir, an existing
// empty directory. The sandbox is paused for the copy (RAM and writable
// layer) and then continues. It refuses with ErrBusy while exec or file
// streams are in flight.
func (s *Sandbox) Snapshot(ctx context.Context, dir string) (*SnapshotInfo, error) {
	sn, ok := s.machine.(vmm.Snapshotter)
	if !ok || s.snap.link == nil {
		return nil, errors.New("snapshot: this sandbox's VMM cannot take snapshots")
	}
	if len(s.snap.opts.Mounts) > 0 || len(s.snap.opts.Volumes) > 0 {
		return nil, errors.New("snapshot: sandboxes with shared directories or volumes (-v) cannot be snapshotted yet")
	}
	s.snap.gate.Lock()
	defer s.snap.gate.Unlock()
	if s.conn.Err() != nil {
		return nil, fmt.Errorf("snapshot: the sandbox is not running: %w", s.conn.Err())
	}
	for deadline := time.Now().Add(idleWait); s.conn.NumStreams() > 0; {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %d exec or file stream(s) in flight; a snapshot now could lose or repeat their data: wait until they finish", ErrBusy, s.conn.NumStreams())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := s.handoff(ctx); err != nil {
		if s.conn.Err() == nil {
			return nil, err // the guest kept the connection
		}
		if rerr := s.reconnect(ctx); rerr != nil {
			s.machine.Kill()
			return nil, fmt.Errorf("%w; reconnecting failed too (%v): the sandbox was stopped", err, rerr)
		}
		s.resumeGuest(ctx)
		return nil, err
	}
	info, err := s.writeSnapshot(ctx, sn, dir)
	if rerr := s.reconnect(ctx); rerr != nil {
		s.machine.Kill()
		return nil, fmt.Errorf("snapshot: guest connection lost after the snapshot (%v): the sandbox was stopped", rerr)
	}
	s.resumeGuest(ctx)
	if err != nil {
		return nil, err
	}
	return info, nil
}

// handoff ends the current connection at a frame both sides agree on (see
// proto.KindHandoff). On success the guest waits for a new host Hello.
func (s *Sandbox) handoff(ctx context.Context) error {
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := s.conn.Open(hctx, proto.Encode(proto.OpenHeader{Kind: proto.KindHandoff}))
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	if _, err := recvResult(hctx, st); err != nil {
		st.Reset("handoff failed")
		return fmt.Errorf("snapshot: guest handoff: %w", err)
	}
	st.Close() // our last frame on this connection
	select {
	case <-st.Done(): // the guest's Close: it reads nothing more of this connection
	case <-hctx.Done():
		s.conn.Close()
		return errors.New("snapshot: the guest did not finish the handoff")
	}
	s.conn.Close() // stops our reader; the socket stays open
	return nil
}

// writeSnapshot pauses the VM, writes it and its layer into dir, and
// resumes it.
func (s *Sandbox) writeSnapshot(ctx context.Context, sn vmm.Snapshotter, dir string) (_ *SnapshotInfo, err error) {
	t0 := time.Now()
	if err := sn.Pause(ctx); err != nil {
		return nil, fmt.Errorf("snapshot: pause: %w", err)
	}
	resumed := false
	defer func() {
		if !resumed {
			if rerr := sn.Resume(context.WithoutCancel(ctx)); rerr != nil && err == nil {
				err = fmt.Errorf("snapshot: resume: %w", rerr)
			}
		}
	}()
	if err := sn.Snapshot(ctx, dir); err != nil {
		return nil, err
	}
	if _, err := sparse.CopyFile(filepath.Join(dir, SnapshotLayerFile), filepath.Join(s.dir, "upper.ext4")); err != nil {
		return nil, fmt.Errorf("snapshot: writable layer: %w", err)
	}
	resumed = true
	if err := sn.Resume(ctx); err != nil {
		return nil, fmt.Errorf("snapshot: resume: %w", err)
	}
	o := s.snap.opts
	info := &SnapshotInfo{
		Format: snapshotFormat, Source: s.ID, Image: o.Image, Rootfs: s.snap.rootfs, ImageConfig: s.snap.image,
		CPUs: o.CPUs, MemoryMiB: o.MemoryMiB, DiskSizeMiB: o.DiskSizeMiB, Accel: s.Accel, Network: s.net != nil,
		Created: time.Now(), Paused: time.Since(t0),
	}
	b, _ := json.MarshalIndent(info, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, SnapshotInfoFile), b, 0o600); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	return info, nil
}

// reconnect makes a new connection over the control socket to a guest that
// waits for one (after a handoff).
func (s *Sandbox) reconnect(ctx context.Context) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		c := proto.NewConn(s.snap.newLink(s.machine.Control()), hostProtoConfig)
		hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = c.Handshake(hctx)
		cancel()
		if err == nil {
			s.conn = c
			return nil
		}
		select {
		case <-machineDone(s.machine):
			return err
		default:
		}
	}
	return err
}

// resumeGuest thaws the workload frozen by the handoff.
func (s *Sandbox) resumeGuest(ctx context.Context) {
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if st, err := s.conn.Open(rctx, proto.Encode(proto.OpenHeader{Kind: proto.KindResume})); err == nil {
		recvResult(rctx, st)
		st.Close()
	}
}

// restore is New for Options.RestoreFrom.
func restore(ctx context.Context, opts Options) (_ *Sandbox, err error) {
	tr := newTracer()
	dir := opts.RestoreFrom
	info, err := ReadSnapshotInfo(dir)
	if err != nil {
		return nil, err
	}
	for _, c := range []struct {
		name      string
		got, want int
	}{{"--cpus", opts.CPUs, info.CPUs}, {"--memory", opts.MemoryMiB, info.MemoryMiB}, {"--disk-size", opts.DiskSizeMiB, info.DiskSizeMiB}} {
		if c.got != 0 && c.got != c.want {
			return nil, fmt.Errorf("%s %d: the snapshot was taken with %d; a restored sandbox keeps the snapshot's resources", c.name, c.got, c.want)
		}
	}
	if opts.Accel != "" && opts.Accel != info.Accel {
		return nil, fmt.Errorf("--accel %s: the snapshot was taken under %s", opts.Accel, info.Accel)
	}
	if len(opts.Mounts) > 0 || len(opts.Volumes) > 0 {
		return nil, errors.New("shared directories and volumes (-v) cannot be added to a sandbox restored from a snapshot")
	}
	if opts.NoNetwork && info.Network {
		return nil, errors.New("the snapshot has a network interface, so a sandbox restored from it has one too: drop --no-network (an empty allow list still blocks all egress)")
	}
	opts.Image, opts.CPUs, opts.MemoryMiB, opts.DiskSizeMiB = info.Image, info.CPUs, info.MemoryMiB, info.DiskSizeMiB
	opts.NoNetwork = !info.Network
	if opts.BootTimeout == 0 {
		opts.BootTimeout = 60 * time.Second
	}
	if err := validate(&opts); err != nil {
		return nil, err
	}
	if _, err := os.Stat(info.Rootfs); err != nil {
		return nil, fmt.Errorf("the image disk of this snapshot is gone (%v): was image %s removed? Take the snapshot again", err, info.Image)
	}
	tr.mark("snapshot")

	s, err := newSandbox(opts, info.Accel, info.Rootfs, info.ImageConfig)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	upper := filepath.Join(s.dir, "upper.ext4")
	if _, err := sparse.CopyFile(upper, filepath.Join(dir, SnapshotLayerFile)); err != nil {
		return nil, fmt.Errorf("writable layer: %w", err)
	}
	tr.mark("layer")
	err = s.launch(ctx, opts, tr, &qemu.Backend{}, vmm.Spec{
		CPUs: opts.CPUs, MemoryMiB: opts.MemoryMiB,
		Disks:       []vmm.Disk{{Path: info.Rootfs, ReadOnly: true}, {Path: upper}},
		Accel:       info.Accel,
		RestoreFrom: dir,
	}, nil)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// DiskUsage returns the bytes allocated on disk by the files of dir.
func DiskUsage(dir string) (total int64, files map[string]int64) {
	files = map[string]int64{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		n := fi.Size()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			n = st.Blocks * 512
		}
		files[e.Name()] = n
		total += n
	}
	return total, files
}

// BootKey names what a boot snapshot of opts depends on: the kernel, the
// guest agent, the image's root disk, the resources, the acceleration, the
// presence of a network interface and the QEMU build. Sandboxes with equal
// keys boot into the same state, so one boot snapshot serves them all
// (package snapshot, warm start). ok is false for options a boot snapshot
// cannot serve (shares, volumes, a restore).
func BootKey(ctx context.Context, opts Options) (key string, ok bool, err error) {
	if opts.RestoreFrom != "" || len(opts.Mounts) > 0 || len(opts.Volumes) > 0 || opts.Images == nil {
		return "", false, nil
	}
	if opts.MemoryMiB == 0 {
		opts.MemoryMiB = 512
	}
	if opts.DiskSizeMiB == 0 {
		opts.DiskSizeMiB = 4096
	}
	if opts.CPUs == 0 {
		opts.CPUs = 1
	}
	kernelPath, err := kernel.Find(opts.Kernel)
	if err != nil {
		return "", false, err
	}
	agentPath, err := FindAgent(opts.Agent)
	if err != nil {
		return "", false, err
	}
	rootfs, _, err := opts.Images.Rootfs(ctx, opts.Image)
	if err != nil {
		return "", false, err
	}
	accel := opts.Accel
	if accel == "" {
		initrd, err := initramfs.Build(agentPath, filepath.Join(paths.CacheDir(), "initramfs"))
		if err != nil {
			return "", false, err
		}
		v := (&qemu.Backend{}).DetectAccel(ctx, kernelPath, initrd, paths.CacheDir())
		accel = v.Accel
		if accel == "tcg" && !v.Cached && opts.Notice != nil {
			opts.Notice(v.Reason + "; using TCG software emulation (slower)")
		}
	}
	h := sha256.New()
	for _, p := range []string{kernelPath, agentPath, rootfs, qemuPath()} {
		fi, err := os.Stat(p)
		if err != nil {
			return "", false, err
		}
		fmt.Fprintf(h, "%s %d %d\n", p, fi.Size(), fi.ModTime().UnixNano())
	}
	fmt.Fprintf(h, "cpus %d mem %d disk %d accel %s net %v format %d\n", opts.CPUs, opts.MemoryMiB, opts.DiskSizeMiB, accel, !opts.NoNetwork, snapshotFormat)
	return hex.EncodeToString(h.Sum(nil)[:8]), true, nil
}

func qemuPath() string {
	p, err := exec.LookPath(qemu.Binary)
	if err != nil {
		return qemu.Binary
	}
	return p
}
