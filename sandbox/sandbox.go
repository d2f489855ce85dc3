// Package sandbox is matchlock's library: it creates a micro-VM from an
// image, runs processes in it, moves files, and destroys it. The CLI, the
// JSON-RPC server and the SDKs are thin faces over this package.
//
// A sandbox is one VM (vmm.Machine) booted from the project's kernel and an
// initramfs holding the guest agent. The image's root filesystem is a
// read-only ext4 disk shared by every sandbox of that image; each sandbox
// writes to its own sparse ext4 layer, overlaid in the guest, so the image
// is never modified. All host↔guest traffic is one guest/proto connection.
package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/internal/initramfs"
	"matchlock.dev/matchlock/internal/paths"
	"matchlock.dev/matchlock/internal/tailbuf"
	"matchlock.dev/matchlock/kernel"
	"matchlock.dev/matchlock/netstack"
	"matchlock.dev/matchlock/vmm"
	"matchlock.dev/matchlock/vmm/qemu"
)

// Sentinel errors callers branch on.
var (
	ErrBootTimeout = errors.New("guest did not come up in time")
	ErrClosed      = errors.New("sandbox closed")
)

// ImageConfig is the part of an OCI image config a sandbox honours.
type ImageConfig struct {
	Entrypoint []string
	Cmd        []string
	Env        []string
	WorkingDir string
	User       string
}

// ImageSource turns an image reference into a bootable root disk.
type ImageSource interface {
	// Rootfs returns the path of a read-only ext4 disk holding the image's
	// flattened root filesystem, and the image's config.
	Rootfs(ctx context.Context, ref string) (path string, cfg ImageConfig, err error)
}

// Options configures a new sandbox.
type Options struct {
	ID     string      `json:"id,omitempty"` // default: NewID()
	Image  string      `json:"image"`
	Images ImageSource `json:"-"`

	Kernel string `json:"kernel,omitempty"` // path of the vmlinux; empty: kernel.Find
	Agent  string `json:"agent,omitempty"`  // path of the guest agent binary; empty: FindAgent
	Accel  string `json:"accel,omitempty"`  // "kvm", "tcg" or "" (detect)

	CPUs        int    `json:"cpus"`
	MemoryMiB   int    `json:"memory_mib"`    // default 512
	DiskSizeMiB int    `json:"disk_size_mib"` // writable layer size; default 4096
	Hostname    string `json:"hostname,omitempty"`

	// Network. With NoNetwork the VM has no NIC at all. Otherwise egress
	// is sealed except for AllowHosts patterns (netstack/policy grammar);
	// AllowPrivate names private destinations that may be reached.
	NoNetwork    bool     `json:"no_network,omitempty"`
	AllowHosts   []string `json:"allow_hosts,omitempty"`
	AllowPrivate []string `json:"allow_private,omitempty"`
	// AddHosts are NAME:IP overrides of the host-side resolver.
	AddHosts []string `json:"add_hosts,omitempty"`
	// Secrets are injected in flight on HTTPS requests to their hosts; the
	// guest sees only a placeholder in $NAME.
	Secrets []Secret `json:"secrets,omitempty"`

	// NetLog receives every network decision and finished connection.
	NetLog func(netstack.Event) `json:"-"`

	// ConsoleLog receives the guest's serial console (kernel messages).
	ConsoleLog io.Writer `json:"-"`
	// Notice receives one-line notices meant for the user (for example
	// that KVM is unusable and TCG is used).
	Notice func(string) `json:"-"`
	// BootTimeout bounds the wait for the guest agent. Default 60 s.
	BootTimeout time.Duration `json:"boot_timeout,omitempty"`

	// Mounts share host directories; Volumes attach named volumes
	// (workspace.go, docs/workspace.md).
	Mounts  []Mount       `json:"mounts,omitempty"`
	Volumes []VolumeMount `json:"volumes,omitempty"`
	// Disks attach raw ext4 disk images read-write, mounted at their
	// targets after the volumes. Unlike volumes they are not locked here:
	// the caller owns the file and its locking (matchlock build's cache).
	Disks []DiskMount `json:"disks,omitempty"`

	// RestoreFrom, when set, is a snapshot directory (see Snapshot): the
	// sandbox resumes from it instead of booting. Image, resources and
	// accel come from the snapshot; identity, network and secrets from
	// these options (see restore in snapshot.go).
	RestoreFrom string `json:"restore_from,omitempty"`
}

// Secret is a value that never enters the VM.
type Secret struct {
	Name  string   `json:"name"`  // environment variable name in the guest
	Value string   `json:"value"` // real value, host memory only
	Hosts []string `json:"hosts"` // host patterns the value may be sent to
}

// Sandbox is one running micro-VM.
type Sandbox struct {
	ID    string
	Image ImageConfig
	Accel string

	dir     string
	machine vmm.Machine
	conn    *proto.Conn
	net     *network // nil with NoNetwork

	placeholders map[string]string // placeholder → secret name

	fwdMu    sync.Mutex // guards forwards
	forwards []*Forward

	snap snapState // snapshot support; its gate guards conn (snapshot.go)

	mnt mountState // shares and volumes (workspace.go)

	closeOnce sync.Once
	closeErr  error
}

// hostProtoConfig bounds what a hostile guest can make this process hold:
// with 64 streams of 128 KiB windows, about 55 MiB worst case (see the
// guest/proto package doc for the formula). 64 concurrent requests per
// sandbox is the resulting limit.
var hostProtoConfig = proto.Config{Initiator: true, Role: "host", Window: 128 << 10, MaxStreams: 64}

// placeholder returns a fresh secret placeholder: SANDBOX_SECRET_ and 32
// hex digits, unguessable so that no other string collides with it.
func placeholder() string {
	var b [16]byte
	rand.Read(b[:])
	return "SANDBOX_SECRET_" + hex.EncodeToString(b[:])
}

// NewID returns a fresh sandbox id: "vm-" and 8 hex digits.
func NewID() string {
	var b [4]byte
	rand.Read(b[:])
	return "vm-" + hex.EncodeToString(b[:])
}

// New boots a sandbox and waits until its guest agent has set up the root
// filesystem. On error nothing of the sandbox remains.
func New(ctx context.Context, opts Options) (_ *Sandbox, err error) {
	if opts.RestoreFrom != "" {
		return restore(ctx, opts)
	}
	if opts.Images == nil {
		return nil, errors.New("sandbox: no image source")
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
	if opts.BootTimeout == 0 {
		opts.BootTimeout = 60 * time.Second
	}
	if err := validate(&opts); err != nil {
		return nil, err
	}
	tr := newTracer()
	kernelPath, err := kernel.Find(opts.Kernel)
	if err != nil {
		return nil, err
	}
	agentPath, err := FindAgent(opts.Agent)
	if err != nil {
		return nil, err
	}
	initrd, err := initramfs.Build(agentPath, filepath.Join(paths.CacheDir(), "initramfs"))
	if err != nil {
		return nil, err
	}
	rootfs, imgCfg, err := opts.Images.Rootfs(ctx, opts.Image)
	if err != nil {
		return nil, err
	}
	tr.mark("image")

	backend := &qemu.Backend{}
	accel := opts.Accel
	if accel == "" {
		v := backend.DetectAccel(ctx, kernelPath, initrd, paths.CacheDir())
		accel = v.Accel
		if accel == "tcg" && !v.Cached && opts.Notice != nil {
			opts.Notice(v.Reason + "; using TCG software emulation (slower)")
		}
	}

	s, err := newSandbox(opts, accel, rootfs, imgCfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	upper := filepath.Join(s.dir, "upper.ext4")
	if err := makeLayer(ctx, upper, opts.DiskSizeMiB); err != nil {
		return nil, err
	}
	tr.mark("layer")
	extraDisks, shares, err := s.prepareMounts(&opts, 2)
	if err != nil {
		return nil, err
	}
	err = s.launch(ctx, opts, tr, backend, vmm.Spec{
		Kernel: kernelPath, Initrd: initrd,
		CPUs: opts.CPUs, MemoryMiB: opts.MemoryMiB,
		Disks:  append([]vmm.Disk{{Path: rootfs, ReadOnly: true}, {Path: upper}}, extraDisks...),
		Shares: shares,
		Accel:  accel,
	}, s.startMounts)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// newSandbox makes the Sandbox that New and restore go on to start: its
// ID, its secrets' placeholders and its directory.
func newSandbox(opts Options, accel, rootfs string, img ImageConfig) (*Sandbox, error) {
	id := opts.ID
	if id == "" {
		id = NewID()
	}
	s := &Sandbox{ID: id, Image: img, Accel: accel}
	s.snap.record(opts, rootfs, img)
	// The guest sees a placeholder for every secret; the real value stays
	// in this process (the TLS interceptor swaps it in flight).
	s.placeholders = map[string]string{}
	for _, sec := range opts.Secrets {
		ph := placeholder()
		s.placeholders[ph] = sec.Name
		s.Image.Env = MergeEnv(s.Image.Env, []string{sec.Name + "=" + ph})
	}
	s.dir = SandboxDir(s.ID)
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return nil, fmt.Errorf("sandbox dir: %w", err)
	}
	return s, nil
}

// launch starts the machine of spec, booted or restored (the network, the
// secrets' CA files and the console are added here), gives the guest agent
// this sandbox's identity and then, if not nil, runs then, all of it after
// the machine started within opts.BootTimeout. The caller closes s if it
// fails.
func (s *Sandbox) launch(ctx context.Context, opts Options, tr *tracer, backend vmm.Backend, spec vmm.Spec, then func(bootCtx context.Context) error) error {
	var guestNet *proto.NetConfig
	if !opts.NoNetwork {
		var err error
		if s.net, err = startNetwork(opts, opts.NetLog); err != nil {
			return err
		}
		spec.Net, guestNet = s.net.vmNet, s.net.guest
	}
	caFiles, err := s.startSecrets(opts)
	if err != nil {
		return err
	}
	tr.mark("network")

	tail := tailbuf.New(8 << 10)
	spec.ConsoleLog, spec.RunDir = tail, s.dir
	if opts.ConsoleLog != nil {
		spec.ConsoleLog = io.MultiWriter(opts.ConsoleLog, tail)
	}
	m, err := backend.Start(ctx, spec)
	if s.net != nil {
		s.net.closeVMEnd()
	}
	if err != nil {
		return err
	}
	s.machine = m
	restored := spec.RestoreFrom != ""
	if restored {
		tr.mark("vmm restored")
	} else {
		tr.mark("vmm started")
	}

	bootCtx, cancel := context.WithTimeout(ctx, opts.BootTimeout)
	defer cancel()
	hostname := opts.Hostname
	if hostname == "" {
		hostname = s.ID
	}
	// The identity of this sandbox: without it every copy of a snapshot
	// would share its clock, RNG state, name and addresses.
	res, err := s.connect(ctx, bootCtx, cancel, tr, tail, &proto.SetupRequest{
		Hostname: hostname, RootDevice: "/dev/vda", RootFSType: "ext4", UpperDevice: "/dev/vdb",
		Net: guestNet, Files: caFiles,
	})
	if err != nil {
		return err
	}
	if res.Error != "" {
		if restored {
			return fmt.Errorf("guest setup after restore: %s", res.Error)
		}
		return fmt.Errorf("guest setup: %s", res.Error)
	}
	if then != nil {
		return then(bootCtx)
	}
	return nil
}

// connect speaks to a freshly started (or restored) machine: it waits for
// the agent's Hello within bootCtx (cancelled early if the VM dies), then
// sends setup with this sandbox's identity — host clock and fresh host
// entropy, so that no two sandboxes (or forks) share either.
func (s *Sandbox) connect(ctx, bootCtx context.Context, cancel context.CancelFunc, tr *tracer, tail *tailbuf.Buffer, req *proto.SetupRequest) (*proto.SetupResult, error) {
	m := s.machine
	go func() {
		// A guest that dies during boot must not leave us waiting.
		select {
		case <-machineDone(m):
			cancel()
		case <-bootCtx.Done():
		}
	}()
	s.conn = proto.NewConn(s.snap.newLink(m.Control()), hostProtoConfig)
	if _, err := s.conn.Handshake(bootCtx); err != nil {
		return nil, s.bootError(ctx, bootCtx, err, tail)
	}
	tr.mark("agent hello")
	req.Entropy = make([]byte, 64)
	rand.Read(req.Entropy)
	req.UnixNano = time.Now().UnixNano()
	res, err := s.call(bootCtx, proto.OpenHeader{Kind: proto.KindSetup, Setup: req})
	if err != nil {
		return nil, s.bootError(ctx, bootCtx, err, tail)
	}
	tr.mark("setup")
	if res.Setup == nil {
		return nil, errors.New("guest setup: no result")
	}
	if tr.on {
		fmt.Fprintf(os.Stderr, "trace: guest %v\n", res.Setup.Timings)
	}
	return res.Setup, nil
}

func (s *Sandbox) bootError(ctx, bootCtx context.Context, err error, tail *tailbuf.Buffer) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	select {
	case <-machineDone(s.machine):
		msg := lastLines(tail.String(), 3)
		if werr := s.machine.Wait(); werr != nil {
			return fmt.Errorf("VM exited during boot: %v (console: %s)", werr, msg)
		}
		return fmt.Errorf("VM exited during boot (console: %s)", msg)
	default:
	}
	if bootCtx.Err() != nil {
		return fmt.Errorf("%w: no answer from the guest agent (console: %s)", ErrBootTimeout, lastLines(tail.String(), 3))
	}
	return fmt.Errorf("boot: %w", err)
}

func machineDone(m vmm.Machine) <-chan struct{} {
	if d, ok := m.(interface{ Done() <-chan struct{} }); ok {
		return d.Done()
	}
	ch := make(chan struct{})
	go func() { m.Wait(); close(ch) }()
	return ch
}

// call opens a stream, waits for its first result or error message, and
// closes it.
func (s *Sandbox) call(ctx context.Context, h proto.OpenHeader) (*proto.StreamMsg, error) {
	st, err := s.OpenStream(ctx, proto.Encode(h))
	if err != nil {
		return nil, err
	}
	defer st.Close()
	return recvResult(ctx, st)
}

func recvResult(ctx context.Context, st *proto.Stream) (*proto.StreamMsg, error) {
	return recvResultWith(ctx, st, nil)
}

// recvResultWith is recvResult that hands every other message to other
// (when set); an error from other ends the wait.
func recvResultWith(ctx context.Context, st *proto.Stream, other func(*proto.StreamMsg) error) (*proto.StreamMsg, error) {
	for {
		b, err := st.RecvMsg(ctx)
		if err != nil {
			return nil, err
		}
		m, err := proto.DecodeStreamMsg(b)
		if err != nil {
			return nil, err
		}
		switch m.Type {
		case proto.MsgResult:
			return m, nil
		case proto.MsgError:
			return nil, guestError(m)
		default:
			if other != nil {
				if err := other(m); err != nil {
					return nil, err
				}
			}
		}
	}
}

// Remote returns a Sandbox whose requests travel over conn to a process
// that relays them to the guest (a supervisor). Exec and the file
// operations work as on a local sandbox; Close only closes conn.
func Remote(id string, conn *proto.Conn) *Sandbox {
	return &Sandbox{ID: id, conn: conn}
}

// Conn is the sandbox's control connection.
func (s *Sandbox) Conn() *proto.Conn {
	s.snap.gate.RLock()
	defer s.snap.gate.RUnlock()
	return s.conn
}

// Stop kills the VM but keeps the sandbox directory (writable layer, logs)
// for inspection; Close or RemoveDir reclaims it.
func (s *Sandbox) Stop() {
	s.syncVolumes()
	defer s.releaseMounts()
	if c := s.Conn(); c != nil {
		c.Close()
	}
	if s.machine != nil {
		s.machine.Kill()
		s.machine.Wait()
	}
	s.closeForwards()
	s.net.close()
}

// Close stops the VM and removes everything the sandbox put on the host.
func (s *Sandbox) Close() error {
	s.closeOnce.Do(func() {
		s.Stop()
		if s.dir != "" {
			s.closeErr = os.RemoveAll(s.dir)
		}
	})
	return s.closeErr
}

// SandboxDir is where a sandbox with this id keeps its files.
func SandboxDir(id string) string { return filepath.Join(paths.StateDir(), "sandboxes", id) }

// Done is closed when the VM has exited (for a remote sandbox: when the
// connection to its supervisor ended).
func (s *Sandbox) Done() <-chan struct{} {
	if s.machine == nil {
		return s.conn.Done()
	}
	return machineDone(s.machine)
}

// Ping measures one round trip over the control channel.
func (s *Sandbox) Ping(ctx context.Context) (time.Duration, error) { return s.Conn().Ping(ctx) }

// Dir is the sandbox's private host directory.
func (s *Sandbox) Dir() string { return s.dir }

// QEMUPid returns the VMM's process id.
func (s *Sandbox) QEMUPid() int {
	if s.machine == nil {
		return 0
	}
	return s.machine.Pid()
}

func validate(o *Options) error {
	if o.CPUs < 1 || o.CPUs > 64 {
		return fmt.Errorf("--cpus %d: want 1 to 64", o.CPUs)
	}
	if o.MemoryMiB < 64 || o.MemoryMiB > 1<<20 {
		return fmt.Errorf("--memory %d: want 64 to 1048576 MiB", o.MemoryMiB)
	}
	if o.DiskSizeMiB < 16 || o.DiskSizeMiB > 16<<20 {
		return fmt.Errorf("--disk-size %d: want 16 MiB to 16 TiB", o.DiskSizeMiB)
	}
	if o.Accel != "" && o.Accel != "kvm" && o.Accel != "tcg" {
		return fmt.Errorf("--accel %q: want kvm or tcg", o.Accel)
	}
	if o.Hostname != "" && !validHostname(o.Hostname) {
		return fmt.Errorf("--hostname %q: want letters, digits and '-', at most 63", o.Hostname)
	}
	return nil
}

func validHostname(h string) bool {
	if len(h) > 63 || h[0] == '-' {
		return false
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// makeLayer creates the sparse, empty ext4 writable layer. Its size is the
// guest's limit: writing past it gives ENOSPC in the guest, and the host
// file never grows beyond it.
func makeLayer(ctx context.Context, path string, sizeMiB int) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("writable layer: %w", err)
	}
	err = f.Truncate(int64(sizeMiB) << 20)
	f.Close()
	if err != nil {
		return fmt.Errorf("writable layer: %w", err)
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return errors.New("mkfs.ext4 not found: install the e2fsprogs package")
	}
	out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", "-m", "0", "-O", "^has_journal",
		"-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0", path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("format writable layer: %v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// FindAgent locates the guest agent binary: explicit, $MATCHLOCK_GUEST, or
// matchlock-guest next to the running executable.
func FindAgent(explicit string) (string, error) {
	cands := []string{explicit, os.Getenv("MATCHLOCK_GUEST")}
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Dir(exe)
		cands = append(cands, filepath.Join(dir, "matchlock-guest"), filepath.Join(dir, "..", "lib", "matchlock", "matchlock-guest"))
	}
	for _, c := range cands {
		if c == "" {
			continue
		}
		if fi, err := os.Stat(c); err == nil && fi.Mode().IsRegular() {
			return c, nil
		}
	}
	return "", errors.New("guest agent matchlock-guest not found next to matchlock: run 'make build' (or set MATCHLOCK_GUEST)")
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	for i := range lines {
		lines[i] = strings.TrimSpace(lines[i])
	}
	out := strings.Join(lines, " | ")
	if out == "" {
		return "empty"
	}
	return out
}

var _ = strconv.Itoa

// tracer prints phase timings to stderr when MATCHLOCK_TRACE is set.
type tracer struct {
	on   bool
	t0   time.Time
	last time.Time
}

func newTracer() *tracer {
	now := time.Now()
	return &tracer{on: os.Getenv("MATCHLOCK_TRACE") != "", t0: now, last: now}
}

func (t *tracer) mark(phase string) {
	if !t.on {
		return
	}
	now := time.Now()
	fmt.Fprintf(os.Stderr, "trace: %-12s +%5.1f ms  (%6.1f ms)\n", phase, float64(now.Sub(t.last))/1e6, float64(now.Sub(t.t0))/1e6)
	t.last = now
}
