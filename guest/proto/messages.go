package proto

import (
	"encoding/json"
	"fmt"
)

// This file holds the typed control messages carried as JSON in Open headers
// and Msg frames. Every decoder is bounded by MaxPayload (a frame never
// exceeds it) and rejects unknown kinds.

// Stream kinds named in an OpenHeader.
const (
	KindSetup     = "setup"      // host → guest, once: configure the machine and assemble the root
	KindExec      = "exec"       // host → guest: run a process
	KindReadFile  = "read_file"  // host → guest: stream a file's bytes back on Stdout
	KindWriteFile = "write_file" // host → guest: write the bytes sent on Stdin
	KindListFiles = "list_files" // host → guest: directory listing
	KindShutdown  = "shutdown"   // host → guest: sync and power off
	// KindMount mounts a share or volume; a "fuse" mount is then served
	// on the stream (host → guest).
	KindMount = "mount"
	// KindHandoff ends the connection at a point both sides agree on, so
	// that the VM can be snapshotted with nothing in flight. The guest
	// freezes the workload's processes and answers MsgResult; the host's
	// Close of the stream is its last frame on this connection; the guest
	// then stops reading, sends its own Close (its last frame) and waits,
	// with Config.AwaitHello, for a new host's Hello on the same port.
	KindHandoff = "handoff"
	// KindResume thaws the processes frozen by a handoff (a setup on an
	// already assembled guest does so too, after applying the identity).
	KindResume = "resume"
)

// OpenHeader is the header of every stream. Exactly one of the request
// fields matching Kind is set.
type OpenHeader struct {
	Kind  string        `json:"kind"`
	Setup *SetupRequest `json:"setup,omitempty"`
	Exec  *ExecRequest  `json:"exec,omitempty"`
	File  *FileRequest  `json:"file,omitempty"`
	Mount *MountRequest `json:"mount,omitempty"`
}

// SetupRequest configures a freshly booted (or restored) guest.
type SetupRequest struct {
	Hostname string `json:"hostname"`
	// UnixNano is the host's wall clock when the request was sent.
	UnixNano int64 `json:"unix_nano"`
	// Entropy is host randomness the guest mixes into its kernel RNG and
	// credits before any workload runs.
	Entropy []byte `json:"entropy"`

	// RootDevice is the read-only image disk; UpperDevice the per-sandbox
	// writable disk. Both are block device paths in the guest.
	RootDevice  string `json:"root_device"`
	RootFSType  string `json:"root_fstype"`
	UpperDevice string `json:"upper_device"`

	Net *NetConfig `json:"net,omitempty"`
	// Files are written into the assembled root before any process runs
	// (CA bundles, /etc/hosts extras). Paths are absolute.
	Files []SetupFile `json:"files,omitempty"`
}

// NetConfig is the guest's static network configuration.
type NetConfig struct {
	Interface string `json:"interface"` // e.g. "eth0"
	Address   string `json:"address"`   // CIDR, e.g. "10.213.0.2/24"
	Gateway   string `json:"gateway"`
	DNS       string `json:"dns"`
	MTU       int    `json:"mtu,omitempty"`
	MAC       string `json:"mac,omitempty"`
}

// SetupFile is one file created during setup.
type SetupFile struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode"`
	Data []byte `json:"data"`
	// Append keeps the file's current content (a missing file is empty)
	// and adds Data after it. Data's first line marks the block: if the
	// current content already has that line, it and everything after it
	// are dropped first, so a setup repeated on a restored guest replaces
	// the block instead of adding another (CA bundles).
	Append bool `json:"append,omitempty"`
}

// SetupResult is the guest's answer to setup.
type SetupResult struct {
	Error string `json:"error,omitempty"`
	// Timings are guest-side phase durations in µs, for tracing.
	Timings map[string]int64 `json:"timings,omitempty"`
}

// ExecRequest starts a process in the guest.
type ExecRequest struct {
	Argv []string `json:"argv"`
	Env  []string `json:"env"`
	Dir  string   `json:"dir,omitempty"`
	// User is "name", "uid", "name:group" or "uid:gid"; names are resolved
	// from the guest's /etc/passwd and /etc/group. Empty means root.
	User  string `json:"user,omitempty"`
	Stdin bool   `json:"stdin"` // read stdin from the Stdin channel (else /dev/null)
	TTY   bool   `json:"tty"`   // allocate a PTY; stderr is merged into it
	Rows  uint16 `json:"rows,omitempty"`
	Cols  uint16 `json:"cols,omitempty"`
}

// FileRequest names a file for read_file, write_file and list_files.
type FileRequest struct {
	Path string `json:"path"`
	Mode uint32 `json:"mode,omitempty"` // write_file: permission bits (default 0644)
}

// MountRequest mounts something at Target after the root is assembled.
// The guest answers MsgResult once it is mounted (or MsgError). For Type
// "fuse" the stream then carries the mount's filesystem requests (see
// guest/proto/fsproto) until either side ends it.
type MountRequest struct {
	Type     string `json:"type"`   // "fuse", "ext4" (a block device) or "9p" (a virtio-9p tag)
	Source   string `json:"source"` // ext4: device path; 9p: mount tag; fuse: a name shown in /proc/mounts
	Target   string `json:"target"` // absolute path in the guest
	ReadOnly bool   `json:"read_only,omitempty"`
	// Overlay (fuse): the guest sees a writable copy-on-write view whose
	// changes stay in the sandbox (upper layer on UpperDevice, or tmpfs).
	Overlay     bool   `json:"overlay,omitempty"`
	UpperDevice string `json:"upper_device,omitempty"`
	// Owner (fuse) is who the host's files appear owned by: "uid:gid", a
	// user[:group] name from the guest's /etc/passwd, or "" for root.
	Owner string `json:"owner,omitempty"`
	// CacheMillis (fuse) is how long the guest caches names and
	// attributes; 0 means the agent's default.
	CacheMillis int `json:"cache_ms,omitempty"`
	// Options is extra mount data (9p, ext4).
	Options string `json:"options,omitempty"`
	// WindowSize (fuse), when positive, offers a read window of that many
	// bytes: the guest pins that much memory, names its pages in a
	// MsgWindow before mounting, and if the host accepts, read replies
	// land there instead of on the stream (fsproto.FlagWindow).
	WindowSize uint64 `json:"window_size,omitempty"`
}

// WindowPages names a read window's memory (StreamMsg.Window): the
// guest-physical frame number of each page, in order, and a nonce. The
// first 8 bytes of page i hold Nonce+i (little-endian), which lets the host
// check that it mapped the pages the guest meant.
type WindowPages struct {
	Frames []byte `json:"frames"` // big-endian u64 page frame numbers
	Nonce  uint64 `json:"nonce"`
}

// Msg types exchanged on a stream after it is open.
const (
	MsgStarted = "started" // guest → host: process started (pid)
	MsgExit    = "exit"    // guest → host: process ended
	MsgError   = "error"   // guest → host: request failed
	MsgSignal  = "signal"  // host → guest: deliver a signal
	MsgResize  = "resize"  // host → guest: PTY window size
	MsgResult  = "result"  // guest → host: generic success with optional payload
	MsgWindow  = "window"  // mount: guest → host: a read window's pages; host → guest: accepted (no Error) or not
)

// StreamMsg is a control message within a stream.
type StreamMsg struct {
	Type string `json:"type"`
	// MsgStarted
	Pid int `json:"pid,omitempty"`
	// MsgExit: Code is the exit status; Signal the terminating signal (0 if none).
	Code   int `json:"code,omitempty"`
	Signal int `json:"signal,omitempty"`
	// MsgError
	Error string `json:"error,omitempty"`
	// ErrorCode classifies MsgError (e.g. "not_found", "permission").
	ErrorCode string `json:"error_code,omitempty"`
	// MsgResize
	Rows uint16 `json:"rows,omitempty"`
	Cols uint16 `json:"cols,omitempty"`
	// MsgResult payloads
	Setup *SetupResult `json:"setup,omitempty"`
	Files []FileInfo   `json:"files,omitempty"`
	Size  int64        `json:"size,omitempty"`
	// MsgWindow (guest → host)
	Window *WindowPages `json:"window,omitempty"`
}

// FileInfo is one entry of a listing.
type FileInfo struct {
	Name  string `json:"name"`
	Size  int64  `json:"size"`
	Mode  uint32 `json:"mode"`
	IsDir bool   `json:"is_dir"`
	MTime int64  `json:"mtime"`
}

// Error codes carried in StreamMsg.ErrorCode.
const (
	ErrCodeNotFound   = "not_found"
	ErrCodePermission = "permission"
	ErrCodeInvalid    = "invalid"
	ErrCodeInternal   = "internal"
)

// DecodeOpenHeader parses and validates a stream header.
func DecodeOpenHeader(b []byte) (*OpenHeader, error) {
	var h OpenHeader
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("open header: %w", err)
	}
	switch h.Kind {
	case KindSetup:
		if h.Setup == nil {
			return nil, fmt.Errorf("open header: setup without request")
		}
	case KindExec:
		if h.Exec == nil || len(h.Exec.Argv) == 0 {
			return nil, fmt.Errorf("open header: exec without argv")
		}
	case KindReadFile, KindWriteFile, KindListFiles:
		if h.File == nil || h.File.Path == "" {
			return nil, fmt.Errorf("open header: %s without path", h.Kind)
		}
	case KindMount:
		if h.Mount == nil || h.Mount.Target == "" {
			return nil, fmt.Errorf("open header: mount without target")
		}
	case KindShutdown, KindHandoff, KindResume:
	default:
		return nil, fmt.Errorf("open header: unknown kind %q", h.Kind)
	}
	return &h, nil
}

// DecodeStreamMsg parses and validates a stream message.
func DecodeStreamMsg(b []byte) (*StreamMsg, error) {
	var m StreamMsg
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("stream message: %w", err)
	}
	switch m.Type {
	case MsgStarted, MsgExit, MsgError, MsgSignal, MsgResize, MsgResult, MsgWindow:
	default:
		return nil, fmt.Errorf("stream message: unknown type %q", m.Type)
	}
	if m.Code < 0 || m.Code > 255 || m.Signal < 0 || m.Signal > 64 {
		return nil, fmt.Errorf("stream message: exit code %d / signal %d out of range", m.Code, m.Signal)
	}
	return &m, nil
}

// Encode marshals a message; the values here always marshal.
func Encode(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("proto: encode %T: %v", v, err))
	}
	return b
}
