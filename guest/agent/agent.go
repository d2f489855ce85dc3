// Package agent is the guest side of matchlock: the static binary that runs
// as PID 1 from the initramfs. It mounts the kernel filesystems, finds the
// control port, and serves the host: setup (clock, entropy, root assembly,
// network), exec, and file transfer. It imports only guest/proto and the
// standard library plus x/sys and creack/pty.
package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
)

// ControlPortName must match the host's virtserialport name.
const ControlPortName = "matchlock.ctl"

// ProbeMarker is printed on the console in probe mode (kernel command line
// word "matchlock.probe"): the host uses it to learn whether an
// acceleration can boot a guest at all.
const ProbeMarker = "MATCHLOCK-PROBE-OK"

// Main is the guest agent's entry point. It never returns when PID 1.
// guestWindow is the receive window the agent grants the host per
// (stream, channel): each credit frame costs a port write, expensive
// under TCG, so a large window streams faster (see docs/workspace.md).
const guestWindow = 4 << 20

func Main() {
	if os.Getpid() != 1 {
		fmt.Fprintln(os.Stderr, "matchlock-guest: must run as PID 1 inside a matchlock VM")
		os.Exit(2)
	}
	if err := run(); err != nil {
		logf("fatal: %v", err)
	}
	powerOff()
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "matchlock-guest: "+format+"\n", args...)
}

func powerOff() {
	freezeVolumes() // volumes outlive the VM: leave their ext4 clean (fusemount.go)
	unix.Sync()
	// With -no-reboot, a reboot makes QEMU exit; a halt would not.
	unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	for {
		time.Sleep(time.Hour)
	}
}

func run() error {
	if err := mountEarly(); err != nil {
		return err
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	for _, w := range strings.Fields(string(cmdline)) {
		if w == "matchlock.probe" {
			fmt.Println(ProbeMarker)
			return nil
		}
	}
	startReaper()
	port, err := findPort(ControlPortName)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(port, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open control port %s: %w", port, err)
	}
	link := proto.NewLink(newVport(f)) // a handoff replaces the Conn, never the port
	conn := proto.NewConn(link, proto.Config{Initiator: false, Role: "guest", Window: guestWindow})
	ctx := context.Background()
	if _, err := conn.Handshake(ctx); err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	s := &server{conn: conn, handover: handover{port: f}}
	for {
		st, err := s.accept(ctx)
		if err != nil {
			return fmt.Errorf("accept: %w", err)
		}
		go s.handle(st)
	}
}

// mountEarly mounts what the agent itself needs inside the initramfs.
func mountEarly() error {
	for _, m := range []struct{ src, dst, fstype, data string }{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devtmpfs", "/dev", "devtmpfs", "mode=0755"},
	} {
		os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fstype, unix.MS_NOSUID, m.data); err != nil && err != unix.EBUSY {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	return nil
}

// findPort returns the /dev node of the virtio-serial port with that name.
// There is no udev in the guest, so read the names from sysfs.
func findPort(name string) (string, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		ents, _ := os.ReadDir("/sys/class/virtio-ports")
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join("/sys/class/virtio-ports", e.Name(), "name"))
			if err == nil && strings.TrimSpace(string(b)) == name {
				return "/dev/" + e.Name(), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("control port %q not found", name)
		}
		// The driver registers ports asynchronously after probe.
		time.Sleep(2 * time.Millisecond)
	}
}

type server struct {
	conn *proto.Conn // replaced by a handoff: read it with current()
	handover
}

func (s *server) handle(st *proto.Stream) {
	defer st.Close()
	h, err := proto.DecodeOpenHeader(st.Header())
	if err != nil {
		sendError(st, proto.ErrCodeInvalid, err)
		return
	}
	switch h.Kind {
	case proto.KindSetup:
		s.setup(st, h.Setup)
	case proto.KindExec:
		execStream(st, h.Exec)
	case proto.KindReadFile:
		readFile(st, h.File)
	case proto.KindWriteFile:
		writeFile(st, h.File)
	case proto.KindListFiles:
		listFiles(st, h.File)
	case proto.KindHandoff:
		s.handoff(st)
	case proto.KindResume:
		thawWorkload()
		st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult}))
	case proto.KindMount:
		mount(st, h.Mount)
	case proto.KindShutdown:
		st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult}))
		st.Close()
		powerOff()
	}
}

func sendError(st *proto.Stream, code string, err error) {
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgError, ErrorCode: code, Error: err.Error()}))
}
