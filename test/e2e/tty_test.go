package e2e

import (
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/creack/pty"
)

// screen collects a PTY's output and lets a test wait for text in it.
type screen struct {
	mu   sync.Mutex
	buf  strings.Builder
	cond *sync.Cond
	done bool
}

func newScreen() *screen { s := &screen{}; s.cond = sync.NewCond(&s.mu); return s }

func (s *screen) Write(p []byte) (int, error) {
	s.mu.Lock()
	s.buf.Write(p)
	s.cond.Broadcast()
	s.mu.Unlock()
	return len(p), nil
}

func (s *screen) close() { s.mu.Lock(); s.done = true; s.cond.Broadcast(); s.mu.Unlock() }

// expect waits until want appears after position from; returns the new
// position.
func (s *screen) expect(t *testing.T, from int, want string, timeout time.Duration) int {
	t.Helper()
	timer := time.AfterFunc(timeout, func() { s.mu.Lock(); s.done = true; s.cond.Broadcast(); s.mu.Unlock() })
	defer timer.Stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		text := s.buf.String()
		if i := strings.Index(text[from:], want); i >= 0 {
			return from + i + len(want)
		}
		if s.done {
			t.Fatalf("timed out waiting for %q; screen: %q", want, text[from:])
		}
		s.cond.Wait()
	}
}

func TestPTYSession(t *testing.T) {
	cmd := exec.Command(bin, "run", "-i", "-t", "--image", "busybox", "sh")
	ptmx, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 40, Cols: 100})
	if err != nil {
		t.Fatal(err)
	}
	defer ptmx.Close()
	scr := newScreen()
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ptmx.Read(buf)
			if n > 0 {
				scr.Write(buf[:n])
			}
			if err != nil {
				scr.close()
				return
			}
		}
	}()
	const wait = 90 * time.Second
	pos := 0
	ptmx.Write([]byte("tty; stty size\r"))
	pos = scr.expect(t, pos, "/dev/pts/", wait)
	pos = scr.expect(t, pos, "40 100", wait)

	// Resize: the kernel sends SIGWINCH to matchlock, which forwards it.
	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 50, Cols: 132}); err != nil {
		t.Fatal(err)
	}
	// The resize travels asynchronously; ask until the guest sees it.
	deadline := time.Now().Add(wait)
	for {
		ptmx.Write([]byte("stty size\r"))
		p, ok := scr.tryExpect(pos, "50 132", 2*time.Second)
		if ok {
			pos = p
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("guest never saw the resize")
		}
	}

	// Ctrl-C interrupts the foreground command, not the session.
	ptmx.Write([]byte("echo sleeping-$((1+1)); sleep 100; echo not-interrupted\r"))
	pos = scr.expect(t, pos, "sleeping-2", wait)
	ptmx.Write([]byte{3})
	ptmx.Write([]byte("echo after-$((40+2))\r"))
	pos = scr.expect(t, pos, "after-42", wait)

	ptmx.Write([]byte("exit 3\r"))
	err = cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 3 {
		t.Fatalf("exit: %v", err)
	}
	scr.mu.Lock()
	defer scr.mu.Unlock()
	if strings.Contains(scr.buf.String(), "\r\nnot-interrupted\r\n") {
		t.Fatal("Ctrl-C did not interrupt sleep")
	}
}

// tryExpect is expect without failing.
func (s *screen) tryExpect(from int, want string, timeout time.Duration) (int, bool) {
	timedOut := false
	timer := time.AfterFunc(timeout, func() { s.mu.Lock(); timedOut = true; s.cond.Broadcast(); s.mu.Unlock() })
	defer timer.Stop()
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		text := s.buf.String()
		if i := strings.Index(text[from:], want); i >= 0 {
			return from + i + len(want), true
		}
		if timedOut || s.done {
			return from, false
		}
		s.cond.Wait()
	}
}
