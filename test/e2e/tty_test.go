package e2e

import (
	"fmt"
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

// text returns the screen between two positions.
func (s *screen) text(from, to int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()[from:to]
}

// The prompt the session sets. The screen shows it only when the shell
// waits for a command: the typed assignment echoes with two quotes in it.
const ptyPrompt = "ml> "

// fgSleep runs sleep 100 in the foreground and prints sleeping-2 once
// sleep is the terminal's foreground process group (field 5, its group,
// equals field 8 of /proc/PID/stat, the terminal's foreground group), as
// seen by a helper in the background: only then does a ^C reach sleep.
// busybox ash hands the terminal to a job in the job's child, after the
// fork: a ^C that arrives before that goes to the shell, which defers it
// while it waits for the job, and sleep runs on. The marker cannot come
// from the command line itself (an echo before sleep) for the same reason.
const fgSleep = `sh -c 'until read -r _ _ _ _ g _ _ f _ </proc/$(pidof sleep)/stat && [ "$g" = "$f" ]; do usleep 10000; done 2>/dev/null; echo sleeping-$((1+1))' & sleep 100; echo not-interrupted`

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
	// Every step waits for what the guest prints; wait is a deadline only.
	const wait = 90 * time.Second
	pos := 0
	// Typed ahead while the VM boots: the terminals keep it until the
	// shell reads it.
	ptmx.Write([]byte("PS1='ml''> '; tty; stty size\r"))
	pos = scr.expect(t, pos, "/dev/pts/", wait)
	pos = scr.expect(t, pos, "40 100", wait)
	pos = scr.expect(t, pos, ptyPrompt, wait)

	// Resize: the kernel sends SIGWINCH to matchlock, which forwards it.
	if err := pty.Setsize(ptmx, &pty.Winsize{Rows: 50, Cols: 132}); err != nil {
		t.Fatal(err)
	}
	// The resize travels asynchronously and the guest prints nothing when
	// it arrives: ask until the guest sees it, one marked question at a
	// time.
	deadline := time.Now().Add(wait)
	for i := 1; ; i++ {
		fmt.Fprintf(ptmx, "stty size; echo probe-$((%d+0)).\r", i)
		end := scr.expect(t, pos, fmt.Sprintf("probe-%d.", i), wait)
		answer := scr.text(pos, end)
		pos = scr.expect(t, end, ptyPrompt, wait)
		if strings.Contains(answer, "50 132") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest never saw the resize; last answer %q", answer)
		}
	}

	// Ctrl-C interrupts the foreground command, not the session.
	ptmx.Write([]byte(fgSleep + "\r"))
	pos = scr.expect(t, pos, "sleeping-2", wait)
	ptmx.Write([]byte{3})
	// The shell shows that it has dealt with the ^C by a fresh prompt;
	// type the next line only then. (The tty discards input queued before
	// a ^C with the signal, NOFLSH being off, as any terminal does.)
	pos = scr.expect(t, pos, ptyPrompt, wait)
	ptmx.Write([]byte("echo after-$((40+2))\r"))
	pos = scr.expect(t, pos, "after-42", wait)
	scr.expect(t, pos, ptyPrompt, wait)

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
