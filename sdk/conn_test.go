package sdk

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"sync"
	"testing"
	"time"
)

// The fast tier: the client against a scripted server over pipes.

type scripted struct {
	t     *testing.T
	w     io.WriteCloser
	wmu   sync.Mutex
	mu    sync.Mutex
	seen  []wireReq
	stdin bytes.Buffer
	eof   bool
	// handle answers a request; nil keeps it unanswered.
	handle func(s *scripted, r wireReq)
}

type wireReq struct {
	ID     json.RawMessage `json:"id"`
	Method string          `json:"method"`
	Params json.RawMessage `json:"params"`
}

func newScripted(t *testing.T, handle func(s *scripted, r wireReq)) (*Client, *scripted) {
	cr, sw := io.Pipe() // server → client
	sr, cw := io.Pipe() // client → server
	s := &scripted{t: t, w: sw, handle: handle}
	go func() {
		sc := bufio.NewScanner(sr)
		sc.Buffer(nil, 8<<20)
		for sc.Scan() {
			var r wireReq
			if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
				t.Errorf("client sent %q: %v", sc.Bytes(), err)
				continue
			}
			s.mu.Lock()
			s.seen = append(s.seen, r)
			s.mu.Unlock()
			s.handle(s, r)
		}
		sw.Close()
	}()
	c := newConn(cr, cw)
	t.Cleanup(func() { c.Close() })
	return c, s
}

func (s *scripted) send(v any) {
	b, _ := json.Marshal(v)
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.w.Write(append(b, '\n'))
}

func (s *scripted) result(r wireReq, res any) {
	s.send(map[string]any{"jsonrpc": "2.0", "id": r.ID, "result": res})
}

func (s *scripted) fail(r wireReq, code int, msg string) {
	s.send(map[string]any{"jsonrpc": "2.0", "id": r.ID, "error": map[string]any{"code": code, "message": msg}})
}

func TestErrorsAndCurrentSandbox(t *testing.T) {
	c, _ := newScripted(t, func(s *scripted, r wireReq) {
		switch r.Method {
		case "create":
			s.result(r, map[string]any{"id": "vm-1", "protocol_version": 1, "image": map[string]any{"workdir": "/w"}})
		case "read_file":
			s.fail(r, CodeNotFound, "open /x: no such file or directory")
		case "exec":
			var p execParams
			json.Unmarshal(r.Params, &p)
			if p.ID != "vm-1" || p.Command != "echo hi" {
				s.fail(r, CodeInvalidParams, "bad exec params")
				return
			}
			s.result(r, map[string]any{"exit_code": 2, "stdout": []byte("hi\n"), "stderr": []byte{}, "duration_ms": 5})
		default:
			s.fail(r, CodeNotSupported, r.Method+" is not supported yet")
		}
	})
	res, err := c.Exec("echo hi")
	if !errors.Is(err, ErrNoSandbox) || res == nil {
		t.Fatalf("exec before launch: %v %v", res, err)
	}
	id, err := c.Launch(New("img").WithEnv("A", "1").AllowHost("x.com").AddSecret("K", "v", "x.com"))
	if err != nil || id != "vm-1" || c.Current().Image.Workdir != "/w" {
		t.Fatalf("launch: %q %v", id, err)
	}
	res, err = c.Exec("echo hi")
	if err != nil || res.Stdout != "hi\n" || res.ExitCode != 2 || res.Duration != 5*time.Millisecond {
		t.Fatalf("exec: %+v %v", res, err)
	}
	_, err = c.ReadFile("/x")
	var re *RPCError
	if !errors.Is(err, ErrNotFound) || !errors.As(err, &re) || re.Code != CodeNotFound {
		t.Fatalf("read_file error: %v", err)
	}
	if _, err := c.Current().AllowListAdd(context.Background(), "y.com"); !errors.Is(err, ErrNotSupported) {
		t.Fatalf("allow_list_add: %v", err)
	}
}

func TestContextCancelSendsCancel(t *testing.T) {
	cancelled := make(chan json.RawMessage, 1)
	var execID json.RawMessage
	c, _ := newScripted(t, func(s *scripted, r wireReq) {
		switch r.Method {
		case "exec":
			execID = r.ID // never answered until cancelled
		case "cancel":
			var p struct {
				RequestID json.RawMessage `json:"request_id"`
			}
			json.Unmarshal(r.Params, &p)
			cancelled <- p.RequestID
			s.fail(wireReq{ID: p.RequestID}, CodeCancelled, "request cancelled")
		}
	})
	c.Use("vm-1")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	_, err := c.ExecContext(ctx, "sleep 100")
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(t0) > 2*time.Second {
		t.Fatalf("cancelled exec: %v after %v", err, time.Since(t0))
	}
	select {
	case id := <-cancelled:
		if string(id) != string(execID) {
			t.Fatalf("cancel for %s, exec was %s", id, execID)
		}
	default:
		t.Fatal("no cancel sent")
	}
}

func TestPipeChunksAndStreams(t *testing.T) {
	c, srv := newScripted(t, func(s *scripted, r wireReq) {
		switch r.Method {
		case "stdin":
			var p struct {
				RequestID json.RawMessage `json:"request_id"`
				Data      []byte          `json:"data"`
				EOF       bool            `json:"eof"`
			}
			json.Unmarshal(r.Params, &p)
			s.mu.Lock()
			s.stdin.Write(p.Data)
			s.eof = p.EOF
			total := s.stdin.Len()
			s.mu.Unlock()
			s.result(r, map[string]any{})
			if p.EOF {
				s.send(map[string]any{"jsonrpc": "2.0", "method": "exec_output", "params": map[string]any{"request_id": p.RequestID, "stream": "stdout", "data": []byte("got it\n")}})
				s.send(map[string]any{"jsonrpc": "2.0", "method": "exec_output", "params": map[string]any{"request_id": p.RequestID, "stream": "stderr", "data": []byte("warn\n")}})
				s.send(map[string]any{"jsonrpc": "2.0", "id": p.RequestID, "result": map[string]any{"exit_code": 0, "duration_ms": total}})
			}
		}
	})
	c.Use("vm-1")
	in := bytes.Repeat([]byte("0123456789"), 200000) // 2 MB: four chunks
	var out, errOut bytes.Buffer
	res, err := c.ExecPipe("cat", bytes.NewReader(in), &out, &errOut)
	if err != nil || res.ExitCode != 0 || out.String() != "got it\n" || errOut.String() != "warn\n" {
		t.Fatalf("exec_pipe: %+v %v %q %q", res, err, out.String(), errOut.String())
	}
	srv.mu.Lock()
	defer srv.mu.Unlock()
	if !bytes.Equal(srv.stdin.Bytes(), in) || !srv.eof {
		t.Fatalf("server got %d stdin bytes (eof %v), want %d", srv.stdin.Len(), srv.eof, len(in))
	}
}

func TestServerGone(t *testing.T) {
	c, _ := newScripted(t, func(s *scripted, r wireReq) {
		if r.Method == "exec" {
			s.w.Close() // the server dies mid-request
		}
	})
	c.Use("vm-1")
	_, err := c.Exec("true")
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("exec with the server gone: %v", err)
	}
	if _, err := c.Exec("true"); !errors.Is(err, ErrClosed) {
		t.Fatalf("exec after: %v", err)
	}
}

func TestNewClientBadBinary(t *testing.T) {
	c, err := NewClient(Config{BinaryPath: "/nonexistent/matchlock"})
	if err == nil || c == nil {
		t.Fatalf("NewClient: %v %v", c, err)
	}
	if _, lerr := c.Launch(New("x")); lerr == nil {
		t.Fatal("Launch on a failed client succeeded")
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}
