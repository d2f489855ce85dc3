package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/snapshot/sparse"
	"matchlock.dev/matchlock/vmm"
)

// Snapshots use QEMU migration to a file, with guest RAM kept out of the
// migration stream wherever possible:
//
//   - A booted machine's RAM is a memfd this process creates and QEMU maps
//     shared (memory-backend-file on /proc/self/fd/N, share=on), so the host
//     can copy it while the machine is paused. Snapshot then migrates with
//     x-ignore-shared (device state only, ~50 KB whatever the RAM size) to
//     StateFile and copies the memfd, holes kept, to MemFile.
//   - A restored machine maps MemFile privately (share=off): pages it never
//     writes are read from the file, so the page cache is shared by every
//     machine restored from one snapshot and MemFile must never change.
//     Its RAM is not shared, so a snapshot of it carries RAM in StateFile
//     (RAM "stream"), and a machine restored from that one gets a memfd
//     again.
//
// The restored machine starts with -incoming defer; x-ignore-shared is set
// over QMP (it has no command-line form in 7.2), then migrate-incoming reads
// StateFile through a descriptor passed with getfd. The source runs with
// store-global-state=off, so the restored machine runs as soon as the state
// is loaded.

// Files of a snapshot directory written by Snapshot.
const (
	StateFile = "vmstate"  // migration stream: device state (and RAM when MetaFile says "stream")
	MemFile   = "memory"   // guest RAM ("file" snapshots)
	MetaFile  = "vmm.json" // snapMeta
)

// ErrIncompatible is returned when a snapshot cannot be restored with a
// spec (other memory, CPUs, devices or QEMU build).
var ErrIncompatible = errors.New("snapshot incompatible with this machine")

// maxBandwidth lifts QEMU's default 128 MiB/s migration cap (bytes/s).
const maxBandwidth = 64 << 30

// snapMeta describes a snapshot's machine; restore checks the spec against it.
type snapMeta struct {
	Format    int    `json:"format"`
	RAM       string `json:"ram"` // "file" (MemFile) or "stream" (in StateFile)
	MemoryMiB int    `json:"memory_mib"`
	CPUs      int    `json:"cpus"`
	Accel     string `json:"accel"`
	Disks     int    `json:"disks"`
	Net       bool   `json:"net"`
	QEMU      string `json:"qemu"` // binary path, size and mtime
}

const snapFormat = 1

// snapState is a Machine's snapshot support.
//
// Locking: mu guards qmp (created on first use).
type snapState struct {
	bin  string
	spec vmm.Spec
	mem  *os.File // our copy of the memfd holding guest RAM; nil when RAM is a private mapping

	mu  sync.Mutex
	qmp *qmp
}

var _ vmm.Snapshotter = (*Machine)(nil)

func (s *snapState) init(bin string, spec vmm.Spec, memfd *os.File) {
	s.bin, s.spec = bin, spec
	if memfd != nil {
		if fd, err := unix.Dup(int(memfd.Fd())); err == nil {
			unix.CloseOnExec(fd)
			s.mem = os.NewFile(uintptr(fd), "guest-ram")
		}
	}
}

func (s *snapState) close() {
	if s.mem != nil {
		s.mem.Close()
	}
}

func memMiB(spec vmm.Spec) int {
	if spec.MemoryMiB <= 0 {
		return 512
	}
	return spec.MemoryMiB
}

func cpus(spec vmm.Spec) int {
	if spec.CPUs <= 0 {
		return 1
	}
	return spec.CPUs
}

// memoryArgs returns the guest RAM options for spec and, for a booted
// machine, the memfd to pass to QEMU as descriptor fd.
func memoryArgs(bin string, spec vmm.Spec, fd int) (*os.File, []string, error) {
	size := memMiB(spec)
	var memfd *os.File
	path, share := "", "on"
	var tail []string
	if dir := spec.RestoreFrom; dir != "" {
		meta, err := readSnapMeta(dir)
		if err != nil {
			return nil, nil, err
		}
		if err := meta.compatible(bin, spec); err != nil {
			return nil, nil, err
		}
		if meta.RAM == "file" {
			path, share = filepath.Join(dir, MemFile), "off"
		}
		tail = []string{"-incoming", "defer"}
	}
	if path == "" {
		mfd, err := unix.MemfdCreate("matchlock-guest-ram", unix.MFD_CLOEXEC)
		if err != nil {
			return nil, nil, fmt.Errorf("qemu: guest RAM: memfd_create: %w", err)
		}
		memfd = os.NewFile(uintptr(mfd), "guest-ram")
		if err := memfd.Truncate(int64(size) << 20); err != nil {
			memfd.Close()
			return nil, nil, fmt.Errorf("qemu: guest RAM: %w", err)
		}
		path = fmt.Sprintf("/proc/self/fd/%d", fd)
	}
	args := []string{
		"-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s", size, escapeComma(path), share),
		"-machine", "memory-backend=mem",
		"-global", "migration.store-global-state=off",
	}
	return memfd, append(args, tail...), nil
}

func readSnapMeta(dir string) (*snapMeta, error) {
	b, err := os.ReadFile(filepath.Join(dir, MetaFile))
	if err != nil {
		return nil, fmt.Errorf("qemu: snapshot: %w", err)
	}
	var m snapMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("qemu: snapshot %s: %w", MetaFile, err)
	}
	if m.Format != snapFormat || (m.RAM != "file" && m.RAM != "stream") {
		return nil, fmt.Errorf("%w: unknown snapshot format %d/%q", ErrIncompatible, m.Format, m.RAM)
	}
	return &m, nil
}

func (m *snapMeta) compatible(bin string, spec vmm.Spec) error {
	var diff []string
	if m.MemoryMiB != memMiB(spec) {
		diff = append(diff, fmt.Sprintf("memory %d MiB (snapshot: %d)", memMiB(spec), m.MemoryMiB))
	}
	if m.CPUs != cpus(spec) {
		diff = append(diff, fmt.Sprintf("%d CPUs (snapshot: %d)", cpus(spec), m.CPUs))
	}
	if m.Accel != spec.Accel {
		diff = append(diff, fmt.Sprintf("accel %s (snapshot: %s)", spec.Accel, m.Accel))
	}
	if m.Disks != len(spec.Disks) {
		diff = append(diff, fmt.Sprintf("%d disks (snapshot: %d)", len(spec.Disks), m.Disks))
	}
	if m.Net != (spec.Net != nil) {
		diff = append(diff, fmt.Sprintf("network %v (snapshot: %v)", spec.Net != nil, m.Net))
	}
	if fp := fingerprint(bin); m.QEMU != fp {
		diff = append(diff, "another QEMU build (snapshot: "+m.QEMU+", now: "+fp+")")
	}
	if len(diff) > 0 {
		return fmt.Errorf("%w: %s", ErrIncompatible, strings.Join(diff, ", "))
	}
	return nil
}

func fingerprint(bin string) string {
	fi, err := os.Stat(bin)
	if err != nil {
		return bin
	}
	return fmt.Sprintf("%s %d %d", bin, fi.Size(), fi.ModTime().Unix())
}

// client returns the QMP client, creating it on first use.
func (m *Machine) client(ctx context.Context) (*qmp, error) {
	s := &m.snap
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.qmp == nil {
		q, err := newQMP(ctx, m.qmp)
		if err != nil {
			return nil, err
		}
		s.qmp = q
	}
	return s.qmp, nil
}

// Pause stops the guest CPUs; QEMU drains block I/O as it stops.
func (m *Machine) Pause(ctx context.Context) error {
	q, err := m.client(ctx)
	if err != nil {
		return err
	}
	return q.do(ctx, "stop", nil, nil, -1)
}

// Resume continues a paused machine (also after a completed snapshot,
// which leaves QEMU in "postmigrate" with its disks inactive: cont takes
// them back).
func (m *Machine) Resume(ctx context.Context) error {
	q, err := m.client(ctx)
	if err != nil {
		return err
	}
	return q.do(ctx, "cont", nil, nil, -1)
}

// Snapshot writes the paused machine to dir: StateFile, MemFile (when the
// RAM is ours to copy) and MetaFile.
func (m *Machine) Snapshot(ctx context.Context, dir string) error {
	q, err := m.client(ctx)
	if err != nil {
		return err
	}
	s := &m.snap
	shared := s.mem != nil
	if err := setIgnoreShared(ctx, q, shared); err != nil {
		return err
	}
	if err := q.do(ctx, "migrate-set-parameters", map[string]any{"max-bandwidth": maxBandwidth}, nil, -1); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, StateFile), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("qemu: snapshot: %w", err)
	}
	err = q.do(ctx, "getfd", map[string]any{"fdname": "snapshot"}, nil, int(f.Fd()))
	f.Close() // QEMU has its own copy now
	if err != nil {
		return err
	}
	if err := q.do(ctx, "migrate", map[string]any{"uri": "fd:snapshot"}, nil, -1); err != nil {
		return err
	}
	if err := m.waitMigration(ctx, q); err != nil {
		return fmt.Errorf("qemu: snapshot: %w", err)
	}
	meta := snapMeta{Format: snapFormat, RAM: "stream", MemoryMiB: memMiB(s.spec), CPUs: cpus(s.spec),
		Accel: s.spec.Accel, Disks: len(s.spec.Disks), Net: s.spec.Net != nil, QEMU: fingerprint(s.bin)}
	if shared {
		meta.RAM = "file"
		if _, err := sparse.Copy(filepath.Join(dir, MemFile), s.mem); err != nil {
			return fmt.Errorf("qemu: snapshot RAM: %w", err)
		}
	}
	b, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, MetaFile), b, 0o600); err != nil {
		return fmt.Errorf("qemu: snapshot: %w", err)
	}
	return nil
}

func setIgnoreShared(ctx context.Context, q *qmp, on bool) error {
	return q.do(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": on}},
	}, nil, -1)
}

// incoming loads the snapshot in dir into a machine started with
// -incoming defer and waits until the guest runs.
func (m *Machine) incoming(ctx context.Context, dir string) error {
	meta, err := readSnapMeta(dir)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		if isClosed(m.done) {
			if msg := strings.TrimSpace(m.stderr.String()); msg != "" {
				return fmt.Errorf("qemu: restore: %s", lastLine(msg))
			}
		}
		return fmt.Errorf("qemu: restore: %w", err)
	}
	q, err := m.client(ctx)
	if err != nil {
		return fail(err)
	}
	if err := setIgnoreShared(ctx, q, meta.RAM == "file"); err != nil {
		return fail(err)
	}
	f, err := os.Open(filepath.Join(dir, StateFile))
	if err != nil {
		return fail(err)
	}
	err = q.do(ctx, "getfd", map[string]any{"fdname": "incoming"}, nil, int(f.Fd()))
	f.Close()
	if err != nil {
		return fail(err)
	}
	if err := q.do(ctx, "migrate-incoming", map[string]any{"uri": "fd:incoming"}, nil, -1); err != nil {
		return fail(err)
	}
	if err := m.waitMigration(ctx, q); err != nil {
		return fail(err)
	}
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := q.do(ctx, "query-status", nil, &st, -1); err != nil {
		return fail(err)
	}
	if !st.Running {
		if err := q.do(ctx, "cont", nil, nil, -1); err != nil {
			return fail(err)
		}
	}
	return nil
}

// waitMigration polls query-migrate until the migration (outgoing or
// incoming) completed or failed.
func (m *Machine) waitMigration(ctx context.Context, q *qmp) error {
	for delay := 500 * time.Microsecond; ; delay = min(2*delay, 10*time.Millisecond) {
		var info struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		if err := q.do(ctx, "query-migrate", nil, &info, -1); err != nil {
			return err
		}
		switch info.Status {
		case "completed":
			return nil
		case "failed", "cancelled":
			if info.ErrorDesc == "" {
				info.ErrorDesc = "migration " + info.Status
			}
			return errors.New(info.ErrorDesc)
		}
		select {
		case <-time.After(delay):
		case <-m.done:
			return errors.New("QEMU exited")
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
