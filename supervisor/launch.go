package supervisor

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"matchlock.dev/matchlock/guest/proto"
	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/state"
)

// Config is everything a supervisor needs. It travels to the supervisor
// over an inherited pipe, never through a file, because Options may hold
// secret values.
type Config struct {
	ID      string          `json:"id"`
	Name    string          `json:"name,omitempty"`
	Options sandbox.Options `json:"options"`
	// Command, when set, is started once the sandbox is up; its output
	// goes to output.log (see `matchlock logs`).
	Command *sandbox.ProcessSpec `json:"command,omitempty"`
	Pull    string               `json:"pull"`
	// Publish are ports to forward for the sandbox's lifetime.
	Publish []sandbox.PortSpec `json:"publish,omitempty"`
	// Snapshot, when set, names the snapshot the sandbox is restored from
	// (held as in use while the supervisor lives).
	Snapshot string `json:"snapshot,omitempty"`
}

// File names inside the sandbox directory.
const (
	SocketName     = "ctl.sock"
	ConsoleLogName = "console.log"
	NetworkLogName = "network.log" // every network decision (sandbox.NetLogFile)
	OutputLogName  = "output.log"
	SupervisorLog  = "supervisor.log"
)

// Socket returns the control socket of sandbox id.
func Socket(id string) string { return filepath.Join(sandbox.SandboxDir(id), SocketName) }

// status is the one line a supervisor writes to its parent when the
// sandbox is up (or could not start).
type status struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// Launch starts a detached supervisor process (exe supervise) for cfg and
// waits until the sandbox is running or has failed to start.
func Launch(ctx context.Context, exe string, cfg Config) error {
	dir := sandbox.SandboxDir(cfg.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	logf, err := os.OpenFile(filepath.Join(dir, SupervisorLog), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	cfgR, cfgW, err := os.Pipe()
	if err != nil {
		return err
	}
	stR, stW, err := os.Pipe()
	if err != nil {
		cfgR.Close()
		cfgW.Close()
		return err
	}
	cmd := exec.Command(exe, "supervise")
	cmd.ExtraFiles = []*os.File{cfgR, stW}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // detached from our terminal
	err = cmd.Start()
	cfgR.Close()
	stW.Close()
	if err != nil {
		cfgW.Close()
		stR.Close()
		return fmt.Errorf("start supervisor: %w", err)
	}
	go cmd.Wait() // reap it if it exits while we are still here
	enc := json.NewEncoder(cfgW)
	err = enc.Encode(cfg)
	cfgW.Close()
	if err != nil {
		stR.Close()
		return fmt.Errorf("configure supervisor: %w", err)
	}
	type res struct {
		st  status
		err error
	}
	ch := make(chan res, 1)
	go func() {
		var st status
		line, err := bufio.NewReader(io.LimitReader(stR, 64<<10)).ReadBytes('\n')
		if err == nil {
			err = json.Unmarshal(line, &st)
		}
		ch <- res{st, err}
	}()
	select {
	case r := <-ch:
		stR.Close()
		if r.err != nil {
			return fmt.Errorf("supervisor exited before the sandbox started (see %s)", filepath.Join(dir, SupervisorLog))
		}
		if !r.st.OK {
			return errors.New(r.st.Error)
		}
		return nil
	case <-ctx.Done():
		cmd.Process.Kill()
		stR.Close()
		return ctx.Err()
	}
}

// Main is the body of the hidden `matchlock supervise` command.
func Main() error {
	cfgF := os.NewFile(3, "config")
	stF := os.NewFile(4, "status")
	report := func(err error) {
		st := status{OK: err == nil}
		if err != nil {
			st.Error = err.Error()
		}
		b, _ := json.Marshal(st)
		stF.Write(append(b, '\n'))
		stF.Close()
	}
	var cfg Config
	if err := json.NewDecoder(io.LimitReader(cfgF, 16<<20)).Decode(&cfg); err != nil {
		report(fmt.Errorf("supervisor config: %w", err))
		return err
	}
	cfgF.Close()
	// The parent may exit (run -d): never die of a closed terminal.
	signal.Ignore(syscall.SIGHUP, syscall.SIGPIPE)
	err := serve(cfg, report)
	if err != nil {
		fmt.Fprintln(os.Stderr, "supervisor:", err)
	}
	return err
}

func serve(cfg Config, report func(error)) error {
	db, err := state.OpenDefault()
	if err != nil {
		report(err)
		return err
	}
	defer db.Close()
	pid := os.Getpid()
	db.SetSupervisor(cfg.ID, pid, state.ProcessStart(pid))

	dir := sandbox.SandboxDir(cfg.ID)
	console, err := os.OpenFile(filepath.Join(dir, ConsoleLogName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		report(err)
		return err
	}
	defer console.Close()
	opts := cfg.Options
	opts.ID = cfg.ID
	opts.ConsoleLog = console
	if netLog, nf, err := sandbox.NetLogFile(filepath.Join(dir, NetworkLogName)); err == nil {
		defer nf.Close()
		opts.NetLog = netLog
	}
	opts.Images = ImageSource(cfg.Pull)
	var notices []string
	opts.Notice = func(s string) { notices = append(notices, s) }

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sigs; cancel() }()

	if cfg.Snapshot != "" {
		release, err := holdSnapshot(db, cfg.Snapshot, cfg.ID, &opts)
		if err != nil {
			db.Finish(cfg.ID, state.StatusStopped, nil, err.Error())
			report(err)
			return err
		}
		defer release()
	}
	sb, err := sandbox.New(ctx, opts)
	if err != nil {
		db.Finish(cfg.ID, state.StatusStopped, nil, err.Error())
		report(err)
		return err
	}
	for _, p := range cfg.Publish {
		if _, err := sb.Publish(p); err != nil {
			sb.Stop()
			db.Finish(cfg.ID, state.StatusStopped, nil, err.Error())
			report(err)
			return err
		}
	}
	sock := Socket(cfg.ID)
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		sb.Stop()
		db.Finish(cfg.ID, state.StatusStopped, nil, err.Error())
		report(err)
		return err
	}
	defer os.Remove(sock)
	var stopOnce sync.Once
	stopped := make(chan struct{})
	stop := func() { stopOnce.Do(func() { close(stopped) }) }
	srv := &Server{SB: sb, Pid: pid, Shutdown: stop, Config: &cfg}
	go srv.Serve(l)
	if err := db.SetRunning(cfg.ID, pid, state.ProcessStart(pid), sb.QEMUPid()); err != nil {
		sb.Stop()
		report(err)
		return err
	}
	for _, n := range notices {
		fmt.Fprintln(os.Stderr, n)
	}
	report(nil)

	if cfg.Command != nil {
		go runCommand(sb, *cfg.Command, filepath.Join(dir, OutputLogName))
	}
	reason := ""
	select {
	case <-stopped:
	case <-ctx.Done():
		reason = "supervisor signalled"
	case <-sb.Done():
		reason = "the VM exited"
	}
	l.Close()
	sb.Stop()
	return db.Finish(cfg.ID, state.StatusStopped, nil, reason)
}

// runCommand runs the sandbox's initial command with its output in a log.
func runCommand(sb *sandbox.Sandbox, spec sandbox.ProcessSpec, logPath string) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	ctx := context.Background()
	o, err := spec.Resolve(sb.Image)
	if err != nil {
		fmt.Fprintf(f, "matchlock: %v\n", err)
		return
	}
	p, err := sb.Exec(ctx, o)
	if err != nil {
		fmt.Fprintf(f, "matchlock: %v\n", err)
		return
	}
	defer p.Close()
	lw := &lockedWriter{w: f}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); io.Copy(lw, p.Stdout()) }()
	go func() { defer wg.Done(); io.Copy(lw, p.Stderr()) }()
	st, err := p.Wait(ctx)
	wg.Wait()
	if err != nil {
		fmt.Fprintf(f, "matchlock: %v\n", err)
	} else if st.Code != 0 {
		fmt.Fprintf(f, "matchlock: command exited with status %d\n", st.Code)
	}
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// Dial connects to the supervisor of sandbox id.
func Dial(ctx context.Context, id string) (*sandbox.Sandbox, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", Socket(id))
	if err != nil {
		return nil, fmt.Errorf("sandbox %s is not running (its supervisor does not answer)", id)
	}
	conn := proto.NewConn(c, proto.Config{Initiator: true, Role: "host"})
	hctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := conn.Handshake(hctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("sandbox %s: supervisor handshake: %w", id, err)
	}
	return sandbox.Remote(id, conn), nil
}

// RequestShutdown asks the supervisor of sandbox id to stop it.
func RequestShutdown(ctx context.Context, id string) error {
	sb, err := Dial(ctx, id)
	if err != nil {
		return err
	}
	defer sb.Conn().Close()
	st, err := sb.Conn().Open(ctx, []byte(`{"kind":"`+KindShutdown+`"}`))
	if err != nil {
		return err
	}
	st.Close()
	// Wait until the supervisor hangs up: it has stopped the VM then.
	select {
	case <-sb.Conn().Done():
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ImageSource is set by the CLI: the image store the supervisor boots
// from, with a pull policy.
var ImageSource func(pull string) sandbox.ImageSource

var _ = strconv.Itoa
var _ = strings.TrimSpace
