package agent

import (
	"context"
	"errors"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"matchlock.dev/matchlock/guest/proto"
)

// A handoff (proto.KindHandoff) ends the agent's connection at a frame
// boundary both sides agree on, before the host snapshots the VM:
//
//	host                                   guest
//	Open handoff  ───────────────────────► freeze the workload
//	              ◄─────────────────────── Msg result  (ready)
//	Close         ───────────────────────► (the host's last frame)
//	                                       stop reading (Link closed)
//	              ◄─────────────────────── Close       (our last frame)
//	stop reading
//	(snapshot; the old host and every restored copy of the VM
//	 each start a new connection on the same port)
//	Hello         ───────────────────────► new Conn, AwaitHello
//	              ◄─────────────────────── Hello
//	setup / resume ──────────────────────► thaw the workload
//
// Neither side reads a byte of the next connection with the previous
// Conn: each stops reading before the other can send more, and a Link
// stops a blocked read without consuming anything (it closes the Conn's
// use of the port, not the port).

// handoffTimeout bounds the wait for the host's Close after we said ready.
const handoffTimeout = 30 * time.Second

// handover is the agent's connection state across handoffs.
//
// Locking: mu guards server.conn and next.
type handover struct {
	port *os.File // the control port; never closed by a handoff

	mu   sync.Mutex
	next chan struct{} // while a handoff is in progress: closed when the next Conn is installed
}

// current returns the connection in use.
func (s *server) current() *proto.Conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
}

// accept returns the next stream the host opens. When a handoff ends the
// connection it waits for the next host instead of failing.
func (s *server) accept(ctx context.Context) (*proto.Stream, error) {
	for {
		c := s.current()
		st, err := c.Accept(ctx)
		if err == nil {
			return st, nil
		}
		s.mu.Lock()
		cur, next := s.conn, s.next
		s.mu.Unlock()
		switch {
		case cur != c:
			// Already replaced.
		case next != nil:
			<-next
		default:
			return nil, err
		}
	}
}

// handoff serves a KindHandoff stream: see the diagram above.
func (s *server) handoff(st *proto.Stream) {
	if err := freezeWorkload(); err != nil {
		logf("handoff: workload not frozen: %v", err)
	}
	if err := st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgResult})); err != nil {
		thawWorkload()
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), handoffTimeout)
	defer cancel()
	if _, err := st.RecvMsg(ctx); !errors.Is(err, io.EOF) {
		// The host reset the stream or went away: keep this connection.
		thawWorkload()
		st.Reset("handoff abandoned")
		return
	}
	s.mu.Lock()
	old := s.conn
	next := make(chan struct{})
	s.next = next
	s.mu.Unlock()
	old.Close() // returns once our reader has stopped
	if err := s.port.SetReadDeadline(time.Time{}); err != nil {
		// The port does not do deadlines, so closing the Conn closed it:
		// open it again (the driver drops nothing, nothing is in flight).
		if f, err := reopenPort(); err == nil {
			s.port = f
		} else {
			logf("handoff: reopen control port: %v", err)
		}
	}
	link := proto.NewLink(newVport(s.port))
	// Our last frame on the old connection, written by hand since its
	// Conn is gone: the host waits for it before it stops reading.
	if err := proto.WriteFrame(link, proto.NewHeader(proto.FrameClose, 0, st.ID(), 0), nil); err != nil {
		logf("handoff: final Close: %v", err)
	}
	go s.awaitHost(link, next)
}

// awaitHost waits for the next host's Hello and installs its connection.
func (s *server) awaitHost(link *proto.Link, next chan struct{}) {
	logged := false
	for {
		c := proto.NewConn(link, proto.Config{Initiator: false, Role: "guest", AwaitHello: true, Window: guestWindow})
		_, err := c.Handshake(context.Background())
		if err == nil {
			s.mu.Lock()
			s.conn = c
			s.next = nil
			s.mu.Unlock()
			close(next)
			return
		}
		if !logged {
			logf("waiting for the next host: %v", err)
			logged = true
		}
		// A failed Conn closed its Link; the port is still ours.
		time.Sleep(20 * time.Millisecond)
		link = proto.NewLink(newVport(s.port))
	}
}

func reopenPort() (*os.File, error) {
	p, err := findPort(ControlPortName)
	if err != nil {
		return nil, err
	}
	return os.OpenFile(p, os.O_RDWR, 0)
}

// The workload is frozen across a snapshot with the cgroup v2 freezer, so
// that no process of a restored copy runs before the host has set its
// clock and reseeded its RNG. Processes in the root cgroup (all of them,
// unless the workload made cgroups of its own) move into frozenCgroup and
// back when thawed.
const (
	cgroupRoot   = "/sys/fs/cgroup"
	frozenCgroup = cgroupRoot + "/matchlock.frozen"
	// pfKthread is PF_KTHREAD in /proc/PID/stat's flags.
	pfKthread = 0x00200000
)

var freezeMu sync.Mutex

func freezeWorkload() error {
	freezeMu.Lock()
	defer freezeMu.Unlock()
	if len(workload()) == 0 {
		return nil // nothing to freeze: thawing costs nothing either
	}
	if err := os.Mkdir(frozenCgroup, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if err := os.WriteFile(frozenCgroup+"/cgroup.freeze", []byte("1"), 0); err != nil {
		return err
	}
	// Processes may fork while we move them: repeat until none is left.
	for round := 0; round < 10; round++ {
		moved := 0
		for _, pid := range workload() {
			if os.WriteFile(frozenCgroup+"/cgroup.procs", []byte(strconv.Itoa(pid)), 0) == nil {
				moved++
			}
		}
		if moved == 0 {
			break
		}
	}
	deadline := time.Now().Add(time.Second)
	for {
		b, err := os.ReadFile(frozenCgroup + "/cgroup.events")
		if err != nil {
			return err
		}
		if strings.Contains(string(b), "frozen 1") {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("processes did not freeze within 1s")
		}
		time.Sleep(time.Millisecond)
	}
}

// thawWorkload undoes freezeWorkload; it is a no-op when nothing is frozen.
func thawWorkload() {
	freezeMu.Lock()
	defer freezeMu.Unlock()
	if _, err := os.Stat(frozenCgroup); err != nil {
		return
	}
	os.WriteFile(frozenCgroup+"/cgroup.freeze", []byte("0"), 0)
	for round := 0; round < 10; round++ {
		b, _ := os.ReadFile(frozenCgroup + "/cgroup.procs")
		pids := strings.Fields(string(b))
		for _, p := range pids {
			os.WriteFile(cgroupRoot+"/cgroup.procs", []byte(p), 0)
		}
		if os.Remove(frozenCgroup) == nil || len(pids) == 0 {
			return
		}
	}
}

// workload lists the processes to freeze: all but the agent and kernel
// threads, in the root cgroup.
func workload() []int {
	var pids []int
	self := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || !inRootCgroup(pid) || isKernelThread(pid) {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

func inRootCgroup(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	return err == nil && strings.TrimSpace(string(b)) == "0::/"
}

func isKernelThread(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return true
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 7 || f[0] == "Z" {
		return true
	}
	flags, err := strconv.ParseUint(f[6], 10, 64)
	return err != nil || flags&pfKthread != 0
}
