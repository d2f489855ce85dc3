package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"matchlock.dev/matchlock/guest/proto"
)

// As PID 1 the agent inherits every orphan, so it reaps with wait4(-1) and
// hands each status to whoever started that pid. Processes are started
// with os.StartProcess (never exec.Cmd.Wait, which would race the reaper).

// procMu guards procs. A start holds it across fork and registration, so
// the reaper can never see an unregistered pid of ours.
var (
	procMu sync.Mutex
	procs  = map[int]chan unix.WaitStatus{}
)

func startReaper() {
	c := make(chan os.Signal, 16)
	signal.Notify(c, unix.SIGCHLD)
	go func() {
		for range c {
			for {
				var ws unix.WaitStatus
				pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
				procMu.Lock()
				ch := procs[pid]
				delete(procs, pid)
				procMu.Unlock()
				if ch != nil {
					ch <- ws
				}
			}
		}
	}()
}

// startProcess starts a process and registers it with the reaper.
//
// Go forks with vfork: the forking thread stops until the child has
// exec'd, keeping its P (the runtime's right to run Go code) all the
// while, with signals blocked. A child whose working directory or program
// lies on a shared directory needs the agent before it gets that far: the
// kernel's FUSE requests for the chdir, the program's path and its first
// page are the agent's to answer. The agent must therefore go on running
// without that P until the exec is done, which two things prevent:
//
//   - with one vCPU there is no other P: one is added for the start;
//   - a stop-the-world (the garbage collector's) waits for every P,
//     this one too, and stops everything else meanwhile: the collector
//     is off for the start.
//
// Without both, `run -v DIR:/w IMAGE /w/prog` deadlocked the sandbox.
// Nothing else in the agent stops the world. Sandboxes without a share
// skip this (it costs two changes of GOMAXPROCS, a few ms under TCG).
func startProcess(path string, argv []string, attr *os.ProcAttr) (*os.Process, chan unix.WaitStatus, error) {
	procMu.Lock()
	defer procMu.Unlock()
	if shareSeq.Load() > 0 {
		if n := runtime.GOMAXPROCS(0); n < 2 {
			runtime.GOMAXPROCS(2)
			defer runtime.GOMAXPROCS(n)
		}
		defer debug.SetGCPercent(debug.SetGCPercent(-1))
	}
	p, err := os.StartProcess(path, argv, attr)
	if err != nil {
		return nil, nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	procs[p.Pid] = ch
	return p, ch, nil
}

const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// drainGrace bounds how long output is still forwarded after the process
// exits while a background child keeps the pipes open.
const drainGrace = 250 * time.Millisecond

func execStream(st *proto.Stream, req *proto.ExecRequest) {
	id, err := resolveUser(req.User, "/etc/passwd", "/etc/group")
	if err != nil {
		sendError(st, proto.ErrCodeInvalid, err)
		return
	}
	env := withDefaults(req.Env, id.Home)
	path, err := lookPath(req.Argv[0], envValue(env, "PATH"))
	if err != nil {
		code := proto.ErrCodeNotFound
		if errors.Is(err, os.ErrPermission) {
			code = proto.ErrCodePermission
		}
		sendError(st, code, err)
		return
	}
	dir := req.Dir
	if dir == "" {
		dir = "/"
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		sendError(st, proto.ErrCodeInvalid, fmt.Errorf("working directory %s: not a directory", dir))
		return
	}

	sys := &syscall.SysProcAttr{Setsid: true}
	if id.UID != 0 || id.GID != 0 || len(id.Groups) > 0 {
		sys.Credential = &syscall.Credential{Uid: id.UID, Gid: id.GID, Groups: id.Groups}
	}

	var (
		files   []*os.File
		closeIn []*os.File // child's ends, closed after start
		outs    []struct {
			r  *os.File
			ch proto.Channel
		}
		stdinW *os.File
		ptmx   *os.File
	)
	if req.TTY {
		m, t, err := pty.Open()
		if err != nil {
			sendError(st, proto.ErrCodeInternal, fmt.Errorf("open pty: %w", err))
			return
		}
		if req.Rows > 0 && req.Cols > 0 {
			pty.Setsize(m, &pty.Winsize{Rows: req.Rows, Cols: req.Cols})
		}
		ptmx = m
		files = []*os.File{t, t, t}
		closeIn = append(closeIn, t)
		sys.Setctty = true
		sys.Ctty = 0
		outs = append(outs, struct {
			r  *os.File
			ch proto.Channel
		}{m, proto.Stdout})
	} else {
		var stdin *os.File
		if req.Stdin {
			r, w, err := os.Pipe()
			if err != nil {
				sendError(st, proto.ErrCodeInternal, err)
				return
			}
			stdin, stdinW = r, w
		} else {
			stdin, err = os.Open(os.DevNull)
			if err != nil {
				sendError(st, proto.ErrCodeInternal, err)
				return
			}
		}
		or, ow, err1 := os.Pipe()
		er, ew, err2 := os.Pipe()
		if err1 != nil || err2 != nil {
			sendError(st, proto.ErrCodeInternal, errors.Join(err1, err2))
			return
		}
		files = []*os.File{stdin, ow, ew}
		closeIn = append(closeIn, stdin, ow, ew)
		outs = append(outs,
			struct {
				r  *os.File
				ch proto.Channel
			}{or, proto.Stdout},
			struct {
				r  *os.File
				ch proto.Channel
			}{er, proto.Stderr})
	}

	proc, waitCh, err := startProcess(path, req.Argv, &os.ProcAttr{Dir: dir, Env: env, Files: files, Sys: sys})
	for _, f := range closeIn {
		f.Close()
	}
	if err != nil {
		for _, o := range outs {
			o.r.Close()
		}
		if stdinW != nil {
			stdinW.Close()
		}
		code := proto.ErrCodeInternal
		if errors.Is(err, os.ErrPermission) {
			code = proto.ErrCodePermission
		} else if errors.Is(err, os.ErrNotExist) {
			code = proto.ErrCodeNotFound
		}
		sendError(st, code, fmt.Errorf("exec %s: %w", req.Argv[0], err))
		return
	}
	st.SendMsg(proto.Encode(proto.StreamMsg{Type: proto.MsgStarted, Pid: proc.Pid}))

	// stdin: host → process.
	if req.Stdin {
		in := stdinW
		if ptmx != nil {
			in = ptmx
		}
		go func() {
			io.Copy(in, st.Reader(proto.Stdin))
			if ptmx == nil {
				in.Close()
			} else {
				// EOF on a terminal: send ^D so that a reading shell sees it.
				ptmx.Write([]byte{4})
			}
		}()
	} else if stdinW != nil {
		stdinW.Close()
	}

	// control messages: signals and resizes.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		for {
			b, err := st.RecvMsg(ctx)
			if err != nil {
				return
			}
			m, err := proto.DecodeStreamMsg(b)
			if err != nil {
				continue
			}
			switch m.Type {
			case proto.MsgSignal:
				if m.Signal > 0 && m.Signal < 65 {
					// The process leads its own session and group (Setsid):
					// signal the group, as a terminal would, so that a shell
					// pipeline stops as a whole.
					if unix.Kill(-proc.Pid, unix.Signal(m.Signal)) != nil {
						unix.Kill(proc.Pid, unix.Signal(m.Signal))
					}
				}
			case proto.MsgResize:
				if ptmx != nil && m.Rows > 0 && m.Cols > 0 {
					pty.Setsize(ptmx, &pty.Winsize{Rows: m.Rows, Cols: m.Cols})
				}
			}
		}
	}()

	// output: process → host.
	var wg sync.WaitGroup
	for _, o := range outs {
		wg.Add(1)
		go func(r *os.File, ch proto.Channel) {
			defer wg.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := r.Read(buf)
				if n > 0 {
					if _, werr := st.Write(ch, buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}(o.r, o.ch)
	}

	ws := <-waitCh
	drained := make(chan struct{})
	go func() { wg.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drainGrace):
		// A background process still holds the output open; stop reading
		// so that the exec can complete.
		for _, o := range outs {
			o.r.SetReadDeadline(time.Now())
		}
		<-drained
	}
	for _, o := range outs {
		o.r.Close()
	}
	st.CloseWrite(proto.Stdout)
	st.CloseWrite(proto.Stderr)

	exit := proto.StreamMsg{Type: proto.MsgExit}
	switch {
	case ws.Exited():
		exit.Code = ws.ExitStatus()
	case ws.Signaled():
		exit.Signal = int(ws.Signal())
	}
	st.SendMsg(proto.Encode(exit))
}

func withDefaults(env []string, home string) []string {
	out := append([]string(nil), env...)
	if envValue(out, "PATH") == "" {
		out = append(out, "PATH="+defaultPath)
	}
	if envValue(out, "HOME") == "" {
		if home == "" {
			home = "/"
		}
		out = append(out, "HOME="+home)
	}
	return out
}

func envValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}

// lookPath finds an executable the way a shell would, using the PATH of the
// process being started rather than the agent's own.
func lookPath(file, path string) (string, error) {
	if strings.Contains(file, "/") {
		if err := checkExec(file); err != nil {
			return "", fmt.Errorf("exec %s: %w", file, err)
		}
		return file, nil
	}
	if path == "" {
		path = defaultPath
	}
	var permErr error
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		err := checkExec(p)
		if err == nil {
			return p, nil
		}
		if errors.Is(err, os.ErrPermission) && permErr == nil {
			permErr = err
		}
	}
	if permErr != nil {
		return "", fmt.Errorf("exec %s: %w", file, permErr)
	}
	return "", fmt.Errorf("exec %s: executable file not found in $PATH: %w", file, os.ErrNotExist)
}

func checkExec(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode()&0o111 == 0 {
		return os.ErrPermission
	}
	return nil
}
