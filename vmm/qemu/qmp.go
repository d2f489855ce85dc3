package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// qmp is a minimal QMP client over the monitor socket QEMU inherited: the
// capabilities handshake, commands (one at a time, matched by id), and
// descriptors passed with SCM_RIGHTS for getfd. Events are read and
// dropped, so QEMU never blocks on a full socket.
//
// Locking: cmdMu serialises commands; mu guards waiter and err.
type qmp struct {
	conn *net.UnixConn

	cmdMu sync.Mutex
	seq   uint64

	mu     sync.Mutex
	waiter chan qmpReply // the command in flight, if any
	waitID string
	err    error // why the reader stopped
	done   chan struct{}
}

type qmpReply struct {
	ID     string          `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event    string          `json:"event"`
	Greeting json.RawMessage `json:"QMP"`
}

// QMPError is an error answer from QEMU.
type QMPError struct {
	Command, Class, Desc string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qemu: %s: %s", e.Command, e.Desc)
}

// qmpMaxLine bounds one QMP message (QEMU's replies here are small).
const qmpMaxLine = 4 << 20

// newQMP reads QEMU's greeting and enters command mode.
func newQMP(ctx context.Context, c net.Conn) (*qmp, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return nil, errors.New("qemu: QMP needs a unix socket")
	}
	q := &qmp{conn: uc, done: make(chan struct{})}
	greet := make(chan error, 1)
	go q.read(greet)
	select {
	case err := <-greet:
		if err != nil {
			return nil, fmt.Errorf("qemu: QMP greeting: %w", err)
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if err := q.do(ctx, "qmp_capabilities", nil, nil, -1); err != nil {
		return nil, err
	}
	return q, nil
}

func (q *qmp) read(greet chan<- error) {
	r := bufio.NewReaderSize(q.conn, 64<<10)
	first := true
	var err error
	for {
		var line []byte
		line, err = readLine(r)
		if err != nil {
			break
		}
		var rep qmpReply
		if err = json.Unmarshal(line, &rep); err != nil {
			err = fmt.Errorf("bad QMP message: %w", err)
			break
		}
		if first {
			first = false
			if rep.Greeting == nil {
				err = errors.New("no QMP greeting")
				break
			}
			greet <- nil
			continue
		}
		if rep.Event != "" || rep.Greeting != nil {
			continue
		}
		q.mu.Lock()
		if q.waiter != nil && rep.ID == q.waitID {
			q.waiter <- rep
			q.waiter = nil
		}
		q.mu.Unlock()
	}
	if first {
		greet <- err
	}
	q.mu.Lock()
	q.err = err
	q.mu.Unlock()
	close(q.done)
}

func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		line = append(line, chunk...)
		if len(line) > qmpMaxLine {
			return nil, errors.New("QMP message too long")
		}
		if err == nil {
			return line, nil
		}
		if err != bufio.ErrBufferFull {
			if err == io.EOF && len(line) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
}

// do runs one command. args is marshalled as "arguments" (nil: none);
// result, if not nil, receives "return". fd >= 0 is passed along with the
// command (SCM_RIGHTS), as getfd expects.
func (q *qmp) do(ctx context.Context, cmd string, args, result any, fd int) error {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	q.seq++
	id := fmt.Sprintf("ml-%d", q.seq)
	msg := map[string]any{"execute": cmd, "id": id}
	if args != nil {
		msg["arguments"] = args
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return err
	}
	ch := make(chan qmpReply, 1)
	q.mu.Lock()
	if q.err != nil || isClosed(q.done) {
		err := q.err
		q.mu.Unlock()
		return fmt.Errorf("qemu: QMP connection ended: %v", err)
	}
	q.waiter, q.waitID = ch, id
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		q.waiter = nil
		q.mu.Unlock()
	}()
	if dl, ok := ctx.Deadline(); ok {
		q.conn.SetWriteDeadline(dl)
		defer q.conn.SetWriteDeadline(time.Time{})
	}
	if fd >= 0 {
		_, _, err = q.conn.WriteMsgUnix(b, unix.UnixRights(fd), nil)
	} else {
		_, err = q.conn.Write(b)
	}
	if err != nil {
		return fmt.Errorf("qemu: QMP %s: %w", cmd, err)
	}
	select {
	case rep := <-ch:
		if rep.Error != nil {
			return &QMPError{Command: cmd, Class: rep.Error.Class, Desc: rep.Error.Desc}
		}
		if result != nil && len(rep.Return) > 0 {
			if err := json.Unmarshal(rep.Return, result); err != nil {
				return fmt.Errorf("qemu: QMP %s: %w", cmd, err)
			}
		}
		return nil
	case <-q.done:
		q.mu.Lock()
		err := q.err
		q.mu.Unlock()
		return fmt.Errorf("qemu: QMP %s: connection ended: %v", cmd, err)
	case <-ctx.Done():
		return fmt.Errorf("qemu: QMP %s: %w", cmd, ctx.Err())
	}
}

func isClosed(ch chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
