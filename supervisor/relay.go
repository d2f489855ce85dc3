// Package supervisor keeps a long-lived sandbox alive in a process of its
// own (one per sandbox, no system daemon) and serves it to other matchlock
// processes over a unix socket in the sandbox's state directory.
//
// The socket speaks guest/proto. A client opens streams exactly as it would
// to the guest; the supervisor relays guest-bound kinds (exec, files) to the
// guest connection stream by stream, and answers its own kinds (info,
// shutdown) itself. So `matchlock exec` runs the same code as `run`.
package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"sync"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/sandbox"
)

// Supervisor-only stream kinds; never forwarded to the guest.
const (
	KindInfo     = "supervisor.info"
	KindShutdown = "supervisor.shutdown"
)

// Info is what KindInfo answers.
type Info struct {
	ID      string              `json:"id"`
	Pid     int                 `json:"pid"`
	QEMUPid int                 `json:"qemu_pid"`
	Accel   string              `json:"accel"`
	Image   sandbox.ImageConfig `json:"image"`
	// Network are the verdict counters (connections, DNS, drops, secrets).
	Network *sandbox.NetStats `json:"network,omitempty"`
}

// GetInfo asks a supervisor (over a Dial'ed sandbox) for its Info.
func GetInfo(ctx context.Context, sb *sandbox.Sandbox) (*Info, error) {
	st, err := sb.Conn().Open(ctx, []byte(`{"kind":"`+KindInfo+`"}`))
	if err != nil {
		return nil, err
	}
	defer st.Close()
	b, err := st.RecvMsg(ctx)
	if err != nil {
		return nil, err
	}
	var info Info
	if err := json.Unmarshal(b, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// maxClients bounds concurrent client connections.
const maxClients = 64

// Server relays client connections to one sandbox.
type Server struct {
	SB       *sandbox.Sandbox
	Pid      int
	Shutdown func()  // called on KindShutdown
	Config   *Config // how the sandbox was made (fork makes more alike)

	sem chan struct{}
}

// Serve accepts clients until l is closed.
func (s *Server) Serve(l net.Listener) error {
	s.sem = make(chan struct{}, maxClients)
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		select {
		case s.sem <- struct{}{}:
			go func() {
				defer func() { <-s.sem }()
				s.serveConn(c)
			}()
		default:
			c.Close()
		}
	}
}

func (s *Server) serveConn(c net.Conn) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conn := proto.NewConn(c, proto.Config{Initiator: false}) // plays the guest side)
	defer conn.Close()
	if _, err := conn.Handshake(ctx); err != nil {
		return
	}
	go func() {
		select {
		case <-conn.Done():
		case <-s.SB.Done():
			conn.Close()
		}
		cancel()
	}()
	for {
		st, err := conn.Accept(ctx)
		if err != nil {
			return
		}
		go s.handle(ctx, st)
	}
}

func (s *Server) handle(ctx context.Context, st *proto.Stream) {
	var h struct {
		Kind string `json:"kind"`
	}
	if err := json.Unmarshal(st.Header(), &h); err != nil {
		st.Reset("bad header")
		return
	}
	switch h.Kind {
	case KindInfo:
		ns := s.SB.NetStats()
		b, _ := json.Marshal(Info{ID: s.SB.ID, Pid: s.Pid, QEMUPid: s.SB.QEMUPid(), Accel: s.SB.Accel, Image: s.SB.Image, Network: &ns})
		st.SendMsg(b)
		st.Close()
	case KindAllowList, KindPortForward:
		s.control(st)
	case KindSnapshot, KindFork:
		s.snapshotRequest(ctx, st)
	case KindShutdown:
		st.Close()
		if s.Shutdown != nil {
			s.Shutdown()
		}
	case proto.KindExec, proto.KindReadFile, proto.KindWriteFile, proto.KindListFiles:
		// Validate before forwarding: the guest only ever sees headers
		// that its own decoder accepts.
		if _, err := proto.DecodeOpenHeader(st.Header()); err != nil {
			st.Reset(err.Error())
			return
		}
		relay(ctx, st, s.SB)
	default:
		st.Reset("unknown kind " + h.Kind)
	}
}

// relay opens the same stream to the guest and pumps both ways until both
// ends are done.
func relay(ctx context.Context, client *proto.Stream, guestConn interface {
	OpenStream(context.Context, []byte) (*proto.Stream, error)
}) {
	guest, err := guestConn.OpenStream(ctx, client.Header())
	if err != nil {
		client.Reset("guest: " + err.Error())
		return
	}
	var wg, out sync.WaitGroup
	pump := func(dst, src *proto.Stream, ch proto.Channel, done *sync.WaitGroup) {
		defer done.Done()
		if _, err := io.Copy(dst.Writer(ch), src.Reader(ch)); err == nil {
			dst.CloseWrite(ch)
		}
	}
	// msgs forwards src's messages to dst. When src closes, dst is closed
	// once the data pumps toward dst (flush) have finished, so that a
	// Close never cuts off output still in flight.
	msgs := func(dst, src *proto.Stream, flush *sync.WaitGroup) {
		defer wg.Done()
		for {
			b, err := src.RecvMsg(ctx)
			if err != nil {
				if errors.Is(err, io.EOF) {
					flush.Wait()
					dst.Close()
				} else {
					dst.Reset("relay: " + err.Error())
				}
				return
			}
			if err := dst.SendMsg(b); err != nil {
				src.Reset("relay: " + err.Error())
				return
			}
		}
	}
	var in sync.WaitGroup
	in.Add(1)
	out.Add(2)
	wg.Add(2)
	go pump(guest, client, proto.Stdin, &in)
	go pump(client, guest, proto.Stdout, &out)
	go pump(client, guest, proto.Stderr, &out)
	go msgs(client, guest, &out)
	go msgs(guest, client, &in)
	// A client that goes away (its connection died, or it reset) takes
	// the guest stream with it. The other way round is handled by msgs:
	// a guest stream that ends abnormally resets the client's.
	go func() {
		<-client.Done()
		guest.Reset("client gone")
	}()
	wg.Wait()
}
