// Package vmm defines the small interface between a sandbox and the virtual
// machine monitor that runs it. The interface speaks of kernels, disks, a
// network link and a control channel; it knows nothing of QEMU, so a
// Firecracker backend can implement it too. The QEMU implementation lives in
// vmm/qemu.
package vmm

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
)

// Spec describes one virtual machine.
type Spec struct {
	Kernel  string   // uncompressed PVH vmlinux
	Initrd  string   // uncompressed cpio initramfs holding the guest agent as /init
	Cmdline []string // extra kernel command-line words (the backend adds its own)

	CPUs      int
	MemoryMiB int

	Disks []Disk // virtio-blk devices, in order: the guest sees vda, vdb, …

	// Shares are host directories exported to the guest by the VMM itself
	// (virtio-9p with QEMU), by mount tag. matchlock's own shares travel
	// over the control channel instead; these exist for comparison.
	Shares []Share

	// Net, when set, attaches one virtio-net device whose Ethernet frames
	// travel over Net.Conn with a 4-byte big-endian length prefix.
	Net *Net

	// ConsoleLog receives everything the guest writes to its serial
	// console. It may be nil.
	ConsoleLog io.Writer

	// RunDir is a private directory the backend may use for sockets and
	// state files. It must exist; the caller removes it.
	RunDir string

	// Accel selects acceleration: "kvm" or "tcg". Empty means the backend
	// decides (see Backend.Probe).
	Accel string

	// RestoreFrom, when set, is a directory written by Snapshotter.Snapshot:
	// the machine resumes from it instead of booting (Kernel, Initrd and
	// Cmdline are ignored). CPUs, MemoryMiB, Accel, the number of disks and
	// the presence of Net must be those of the snapshotted machine; disks
	// may be other files with the same content. The directory's files must
	// not change while the machine runs.
	RestoreFrom string
}

// Disk is a raw disk image attached as a virtio block device.
type Disk struct {
	Path     string
	ReadOnly bool
}

// Share is a host directory the VMM exports under a mount tag.
type Share struct {
	Tag      string // at most 31 bytes: letters, digits, '_', '-'
	Path     string
	ReadOnly bool
}

// Net is a virtual NIC backed by a stream socket carrying length-prefixed
// Ethernet frames.
type Net struct {
	Conn *os.File // one end of a socketpair; the backend passes it to the VMM
	MAC  string   // e.g. "02:4d:4c:00:00:02"
	MTU  int      // host MTU hint for the device; 0 means the default
	// Slirp attaches the NIC to the VMM's built-in user networking
	// (QEMU -netdev user, guest network 10.213.0.0/24, the host reachable
	// at 10.213.0.1) instead of Conn. Benchmark baseline only
	// (bench/network): it bypasses the network policy entirely.
	Slirp bool
}

// Backend starts machines.
type Backend interface {
	// Start launches a machine. The machine is bound to the calling
	// process: if that process dies, even by SIGKILL, the machine dies too.
	Start(ctx context.Context, spec Spec) (Machine, error)
}

// Machine is one running virtual machine.
type Machine interface {
	// Control returns the host end of the guest-agent channel. It is
	// connected from the moment Start returns.
	Control() net.Conn
	// Wait blocks until the machine has exited and returns why.
	Wait() error
	// Kill stops the machine at once. It is safe to call more than once.
	Kill() error
	// Pid is the host process id of the VMM, for diagnostics and reaping.
	Pid() int
}

// GuestMemory is implemented by machines whose RAM this process can map.
type GuestMemory interface {
	// MapGuest maps the given guest-physical ranges of the machine's RAM
	// (page-aligned, each inside RAM), in order, into one contiguous
	// mapping in this process: what the guest writes there, this process
	// reads, and the reverse. The mapping stays valid after the machine
	// exits (the pages are this process's); the caller unmaps it
	// (unix.Munmap) once nothing uses it. It fails with
	// ErrNoGuestMemory when the machine's RAM cannot be shared (a machine
	// restored from a snapshot file).
	MapGuest(ranges []MemRange) ([]byte, error)
}

// MemRange is a range of guest-physical memory.
type MemRange struct {
	Addr, Size uint64
}

// ErrNoGuestMemory is returned by GuestMemory.MapGuest when the machine's
// RAM cannot be mapped.
var ErrNoGuestMemory = errors.New("machine RAM cannot be shared")

// Snapshotter is implemented by machines that can be snapshotted. The
// caller quiesces the guest first (nothing in flight on the control
// channel), then:
//
//	Pause → Snapshot(dir) → (copy disks: they are consistent now) → Resume
type Snapshotter interface {
	// Pause stops the guest's CPUs and drains its block I/O.
	Pause(ctx context.Context) error
	// Snapshot writes the paused machine's RAM and device state into dir,
	// an existing empty directory, for Spec.RestoreFrom. Disks are not
	// copied. The machine stays paused.
	Snapshot(ctx context.Context, dir string) error
	// Resume continues a paused machine.
	Resume(ctx context.Context) error
}

// ErrNoAccel is returned when a requested acceleration is unavailable.
var ErrNoAccel = errors.New("acceleration unavailable")
