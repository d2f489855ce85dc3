package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"encoding/json"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"matchlock.dev/matchlock/netstack"
	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/state"
	"matchlock.dev/matchlock/supervisor"
)

func init() { register(newRunCmd) }

type runFlags struct {
	image      string
	env        []string
	envFiles   []string
	workdir    string
	user       string
	entrypoint string
	entrySet   bool
	stdin      bool
	tty        bool
	timeout    int
	cpus       int
	memory     int
	diskSize   int
	hostname   string
	rm         bool
	detach     bool
	name       string
	allowHost  []string
	allowPriv  []string
	addHosts   []string
	publish    []string
	noNetwork  bool
	secrets    []string
	logNetwork bool
	kernel     string
	accel      string
	pull       string
	snapshot   string                 // restore this snapshot (snapshot.go)
	cold       bool                   // never restore a boot snapshot
	changed    func(name string) bool // whether a flag was given
	volumes    []string
	workspace  string
}

func newRunCmd() *cobra.Command {
	f := &runFlags{}
	cmd := &cobra.Command{
		Use:   "run --image IMAGE [flags] [--] [COMMAND [ARG...]]",
		Short: "Run a command in a new sandbox",
		Long: `Run a command in a new micro-VM booted from IMAGE.

The command runs as the image's ENTRYPOINT + (COMMAND or CMD), with the
image's environment, working directory and user unless overridden. Flags
after the first command word belong to the command. The sandbox and its
writable layer are removed when the command ends.

Exit status is the command's; 128+N when it was killed by signal N; 124 when
--timeout expired; 125 when matchlock itself failed; 126/127 when the
command could not be run / was not found.`,
		Example: `  matchlock run --image busybox echo hello
  matchlock run --image alpine:latest sh -c 'echo $HOME'
  matchlock run -it --image alpine:latest sh`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			f.entrySet = cmd.Flags().Changed("entrypoint")
			f.changed = cmd.Flags().Changed
			return runRun(cmd.Context(), f, args)
		},
	}
	fl := cmd.Flags()
	fl.SetInterspersed(false)
	fl.StringVar(&f.image, "image", "", "image to boot (name[:tag], name@digest)")
	fl.StringArrayVarP(&f.env, "env", "e", nil, "set an environment variable (KEY=VALUE, or KEY to copy it from the host)")
	fl.StringArrayVar(&f.envFiles, "env-file", nil, "read environment variables from a file (KEY=VALUE lines)")
	fl.StringVarP(&f.workdir, "workdir", "w", "", "working directory in the guest (default: image WORKDIR, else /)")
	fl.StringVarP(&f.user, "user", "u", "", "user[:group] to run as, names or ids (default: image USER)")
	fl.StringVar(&f.entrypoint, "entrypoint", "", "override the image ENTRYPOINT (empty string clears it)")
	fl.BoolVarP(&f.stdin, "interactive", "i", false, "pipe standard input to the command")
	fl.BoolVarP(&f.tty, "tty", "t", false, "allocate a pseudo-terminal")
	fl.IntVar(&f.timeout, "timeout", 0, "stop the sandbox after SEC seconds (exit 124)")
	fl.IntVar(&f.cpus, "cpus", 1, "virtual CPUs")
	fl.IntVar(&f.memory, "memory", 512, "guest memory in MiB")
	fl.IntVar(&f.diskSize, "disk-size", 4096, "size of the writable layer in MiB")
	fl.StringVar(&f.hostname, "hostname", "", "guest hostname (default: the sandbox id)")
	fl.BoolVar(&f.rm, "rm", true, "remove the sandbox when the command exits (--rm=false keeps it running)")
	fl.BoolVarP(&f.detach, "detach", "d", false, "start the sandbox in the background and print its ID")
	fl.StringVar(&f.name, "name", "", "name the sandbox (usable wherever an ID is)")
	fl.StringArrayVar(&f.allowHost, "allow-host", nil, "allow egress to a host pattern (repeatable, comma lists): name, *.domain, name:port, *, IP, CIDR[:port]")
	fl.StringArrayVar(&f.allowPriv, "allow-private", nil, "also allow HOST[:PORT] when it is private/loopback (it must be allowed by --allow-host too)")
	fl.StringArrayVarP(&f.publish, "publish", "p", nil, "forward [HOST_IP:]HOST_PORT:GUEST_PORT into the guest (host IP default 127.0.0.1)")
	fl.BoolVar(&f.noNetwork, "no-network", false, "no network interface at all")
	fl.StringArrayVar(&f.addHosts, "add-host", nil, "resolve NAME to IP on the host side (NAME:IP); the policy still applies")
	fl.StringArrayVar(&f.secrets, "secret", nil, "NAME@host1,host2 (value from $NAME) or NAME=VALUE@hosts: the guest sees a placeholder")
	fl.BoolVar(&f.logNetwork, "log-network", false, "print every connection and refusal on stderr")
	fl.StringVar(&f.kernel, "kernel", "", "guest kernel (default: $MATCHLOCK_KERNEL, else the built one)")
	fl.StringVar(&f.accel, "accel", "", "acceleration: kvm or tcg (default: detect)")
	fl.StringVar(&f.pull, "pull", "missing", "pull policy: always, missing or never")
	fl.StringVar(&f.snapshot, "snapshot", "", "restore a new sandbox from this snapshot instead of booting (see 'matchlock snapshot')")
	fl.BoolVar(&f.cold, "cold", false, "boot from scratch instead of restoring the cached boot snapshot (--rm runs)")
	fl.StringArrayVarP(&f.volumes, "volume", "v", nil, "share HOST_DIR:GUEST_PATH[:ro|:overlay][,uid=N,gid=N], or attach @VOLUME:GUEST_PATH[:ro]")
	fl.StringVar(&f.workspace, "workspace", "", "share HOST_DIR read-write at /workspace (-v HOST_DIR:/workspace)")
	return cmd
}

// exit codes in the Docker tradition.
const (
	exitFailure    = 125
	exitCannotRun  = 126
	exitNotFound   = 127
	exitTimeout    = 124
	exitSignalBase = 128
)

func failure(err error) error { return &ExitError{Code: exitFailure, Err: err} }

func runRun(ctx context.Context, f *runFlags, args []string) error {
	if f.image == "" && f.snapshot == "" {
		return failure(errors.New("run: --image is required (for example --image busybox)"))
	}
	if f.cpus < 1 {
		return failure(fmt.Errorf("run: --cpus %d: want at least 1", f.cpus))
	}
	if f.memory < 1 || f.diskSize < 1 {
		return failure(fmt.Errorf("run: --memory %d / --disk-size %d: want positive sizes in MiB", f.memory, f.diskSize))
	}
	if f.timeout < 0 {
		return failure(fmt.Errorf("run: --timeout %d: want a positive number of seconds", f.timeout))
	}
	switch f.pull {
	case "always", "missing", "never":
	default:
		return failure(fmt.Errorf("run: --pull %q: want always, missing or never", f.pull))
	}
	if f.detach && f.stdin {
		return failure(errors.New("run: -d and -i cannot be combined: use 'matchlock exec -i' on the detached sandbox"))
	}
	if f.name != "" && !validName(f.name) {
		return failure(fmt.Errorf("run: --name %q: want letters, digits, '.', '_' or '-', at most 64, starting with a letter or digit", f.name))
	}
	extraEnv, err := collectEnv(f.env, f.envFiles)
	if err != nil {
		return failure(err)
	}
	spec := sandbox.ProcessSpec{Args: args, Env: extraEnv, Dir: f.workdir, User: f.user, Stdin: f.stdin, TTY: f.tty}
	if f.entrySet {
		spec.Entrypoint = &f.entrypoint
	}
	if f.tty {
		term := os.Getenv("TERM")
		if term == "" {
			term = "xterm"
		}
		spec.Env = append([]string{"TERM=" + term}, spec.Env...)
	}
	secrets, err := parseSecrets(f.secrets)
	if err != nil {
		return failure(err)
	}
	opts := sandbox.Options{
		Image: f.image, Kernel: f.kernel, Accel: f.accel,
		CPUs: f.cpus, MemoryMiB: f.memory, DiskSizeMiB: f.diskSize, Hostname: f.hostname,
		NoNetwork: f.noNetwork, AllowHosts: splitLists(f.allowHost), AllowPrivate: splitLists(f.allowPriv),
		AddHosts: f.addHosts,
		Secrets:  secrets,
	}
	if err := addMounts(&opts, f.volumes, f.workspace); err != nil {
		return failure(fmt.Errorf("run: %w", err))
	}
	if f.noNetwork && (len(opts.AllowHosts) > 0 || len(opts.Secrets) > 0) {
		return failure(errors.New("run: --no-network cannot be combined with --allow-host or --secret"))
	}
	if err := sandbox.ValidateNetwork(opts); err != nil && !f.noNetwork {
		return failure(err)
	}
	if f.logNetwork {
		opts.NetLog = printNetEvent
	}
	var ports []sandbox.PortSpec
	for _, p := range f.publish {
		ps, err := sandbox.ParsePortSpec(p)
		if err != nil {
			return failure(fmt.Errorf("-p: %w", err))
		}
		ports = append(ports, ps)
	}
	if len(ports) > 0 && f.noNetwork {
		return failure(errors.New("run: -p needs a network: drop --no-network"))
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// Signals during boot stop the boot; after it they go to the guest.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGWINCH)
	defer signal.Stop(sigs)
	bootDone := make(chan struct{})
	go func() {
		for {
			select {
			case s := <-sigs:
				if s != syscall.SIGWINCH {
					cancel()
					return
				}
			case <-bootDone:
				return
			}
		}
	}()

	var timeoutC <-chan time.Time
	if f.timeout > 0 {
		t := time.NewTimer(time.Duration(f.timeout) * time.Second)
		defer t.Stop()
		timeoutC = t.C
	}

	release, err := restoreOptions(f, &opts)
	if err != nil {
		return failure(fmt.Errorf("run: %w", err))
	}
	defer release()
	if !f.rm || f.detach {
		return runLongLived(ctx, f, opts, spec, ports, bootDone, sigs, timeoutC)
	}

	opts.Images = imageSource(f.pull)
	opts.Notice = func(s string) { fmt.Fprintln(os.Stderr, "matchlock: "+s) }
	sb, releaseBoot, err := boot(ctx, f, opts)
	close(bootDone)
	if err != nil {
		return bootFailure(err)
	}
	defer releaseBoot()
	defer sb.Close()
	for _, p := range ports {
		if _, err := sb.Publish(p); err != nil {
			return failure(err)
		}
	}
	eo, err := spec.Resolve(sb.Image)
	if err != nil {
		return failure(fmt.Errorf("run: %w", err))
	}
	return attach(ctx, sb, eo, sigs, timeoutC, f.timeout)
}

// splitLists flattens repeatable flags that also take comma lists.
func splitLists(vals []string) []string {
	var out []string
	for _, v := range vals {
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// parseSecrets reads --secret NAME@hosts (value from $NAME) and
// NAME=VALUE@hosts. The value never appears in an error message.
func parseSecrets(vals []string) ([]sandbox.Secret, error) {
	var out []sandbox.Secret
	seen := map[string]bool{}
	for _, v := range vals {
		at := strings.LastIndexByte(v, '@')
		if at < 0 {
			return nil, fmt.Errorf("--secret: want NAME@host[,host...] or NAME=VALUE@host[,host...]")
		}
		spec, hostList := v[:at], v[at+1:]
		name, value, hasValue := strings.Cut(spec, "=")
		if !validEnvName(name) {
			return nil, fmt.Errorf("--secret: %q is not a valid environment variable name", name)
		}
		if !hasValue {
			hv, ok := os.LookupEnv(name)
			if !ok {
				return nil, fmt.Errorf("--secret %s: $%s is not set on the host", name, name)
			}
			value = hv
		}
		if value == "" {
			return nil, fmt.Errorf("--secret %s: the value is empty", name)
		}
		hosts := splitLists([]string{hostList})
		if len(hosts) == 0 {
			return nil, fmt.Errorf("--secret %s: name at least one host after '@'", name)
		}
		if seen[name] {
			return nil, fmt.Errorf("--secret %s: given twice", name)
		}
		seen[name] = true
		out = append(out, sandbox.Secret{Name: name, Value: value, Hosts: hosts})
	}
	return out, nil
}

func validEnvName(s string) bool {
	if s == "" {
		return false
	}
	for i, c := range s {
		if !(c == '_' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// printNetEvent prints one network decision (connections, refusals, DNS
// answers, and the secrets proxy's TLS interceptions, substitutions and
// blocks) on stderr.
func printNetEvent(e netstack.Event) {
	fmt.Fprintln(os.Stderr, "matchlock: net "+e.String())
}

func bootFailure(err error) error {
	if errors.Is(err, context.Canceled) {
		return &ExitError{Code: exitSignalBase + int(syscall.SIGINT), Err: errors.New("interrupted while starting the sandbox")}
	}
	return failure(err)
}

// runLongLived starts the sandbox under its own supervisor process, so it
// outlives this command (--rm=false, -d).
func runLongLived(ctx context.Context, f *runFlags, opts sandbox.Options, spec sandbox.ProcessSpec, ports []sandbox.PortSpec, bootDone chan struct{}, sigs chan os.Signal, timeoutC <-chan time.Time) error {
	db, err := state.OpenDefault()
	if err != nil {
		close(bootDone)
		return failure(err)
	}
	defer db.Close()
	id := sandbox.NewID()
	cfgJSON, _ := json.Marshal(publicConfig(opts))
	if err := db.Insert(&state.Record{ID: id, Name: f.name, Image: f.image, Status: state.StatusStarting, Created: time.Now(), Config: cfgJSON}); err != nil {
		close(bootDone)
		if errors.Is(err, state.ErrNameInUse) {
			return failure(fmt.Errorf("run: --name %s is already used by another sandbox: pick another name or 'matchlock rm %s'", f.name, f.name))
		}
		return failure(err)
	}
	exe, err := os.Executable()
	if err != nil {
		close(bootDone)
		return failure(err)
	}
	cfg := supervisor.Config{ID: id, Name: f.name, Options: opts, Pull: f.pull, Publish: ports, Snapshot: f.snapshot}
	if f.detach && len(spec.Args) > 0 || f.detach && spec.Entrypoint != nil {
		cfg.Command = &spec
	}
	err = supervisor.Launch(ctx, exe, cfg)
	close(bootDone)
	if err != nil {
		db.Finish(id, state.StatusStopped, nil, err.Error())
		return bootFailure(err)
	}
	if f.detach || (len(spec.Args) == 0 && spec.Entrypoint == nil) {
		fmt.Println(id)
		return nil
	}
	sb, err := supervisor.Dial(ctx, id)
	if err != nil {
		return failure(err)
	}
	defer sb.Conn().Close()
	info, err := supervisor.GetInfo(ctx, sb)
	if err != nil {
		return failure(err)
	}
	eo, err := spec.Resolve(info.Image)
	if err != nil {
		return failure(fmt.Errorf("run: %w", err))
	}
	err = attach(ctx, sb, eo, sigs, timeoutC, f.timeout)
	fmt.Fprintf(os.Stderr, "matchlock: sandbox %s keeps running ('matchlock exec %s …', 'matchlock kill %s')\n", id, id, id)
	return err
}

// publicConfig is what the state database records of a sandbox: secret
// names and hosts, never values.
func publicConfig(o sandbox.Options) map[string]any {
	var secrets []map[string]any
	for _, s := range o.Secrets {
		secrets = append(secrets, map[string]any{"name": s.Name, "hosts": s.Hosts})
	}
	return map[string]any{
		"image": o.Image, "cpus": o.CPUs, "memory_mib": o.MemoryMiB, "disk_size_mib": o.DiskSizeMiB,
		"hostname": o.Hostname, "no_network": o.NoNetwork, "allow_hosts": o.AllowHosts,
		"allow_private": o.AllowPrivate, "secrets": secrets,
		"mounts": o.Mounts, "volumes": o.Volumes,
	}
}

func validName(n string) bool {
	if n == "" || len(n) > 64 || strings.HasPrefix(n, "vm-") {
		return false
	}
	for i, c := range n {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || (c != '.' && c != '_' && c != '-')) {
			return false
		}
	}
	return true
}

// attach runs one process in sb wired to this terminal: stdio streamed,
// signals forwarded, PTY raw mode and resizes, exit status mapped.
func attach(ctx context.Context, sb *sandbox.Sandbox, opts sandbox.ExecOptions, sigs chan os.Signal, timeoutC <-chan time.Time, timeout int) error {
	stdinFD := int(os.Stdin.Fd())
	isTerm := term.IsTerminal(stdinFD)
	if opts.TTY {
		if w, h, err := term.GetSize(int(os.Stdout.Fd())); err == nil {
			opts.Cols, opts.Rows = uint16(w), uint16(h)
		}
	}
	proc, err := sb.Exec(ctx, opts)
	if err != nil {
		var ge *sandbox.GuestError
		if errors.As(err, &ge) {
			switch {
			case errors.Is(err, sandbox.ErrNotFound):
				return &ExitError{Code: exitNotFound, Err: err}
			case errors.Is(err, sandbox.ErrPermission):
				return &ExitError{Code: exitCannotRun, Err: err}
			}
			return &ExitError{Code: exitCannotRun, Err: err}
		}
		return failure(err)
	}
	defer proc.Close()

	if opts.TTY && opts.Stdin && isTerm {
		if old, err := term.MakeRaw(stdinFD); err == nil {
			defer term.Restore(stdinFD, old)
		}
	}

	var outWG sync.WaitGroup
	outWG.Add(2)
	go func() { defer outWG.Done(); io.Copy(os.Stdout, proc.Stdout()) }()
	go func() { defer outWG.Done(); io.Copy(os.Stderr, proc.Stderr()) }()
	if opts.Stdin {
		go func() {
			w := proc.Stdin()
			io.Copy(w, os.Stdin)
			w.Close()
		}()
	}

	type result struct {
		st  sandbox.ExitStatus
		err error
	}
	waitC := make(chan result, 1)
	go func() {
		st, err := proc.Wait(ctx)
		waitC <- result{st, err}
	}()
	for {
		select {
		case r := <-waitC:
			outWG.Wait()
			if r.err != nil {
				return failure(r.err)
			}
			if r.st.Code == 0 {
				return nil
			}
			return &ExitError{Code: r.st.Code}
		case s := <-sigs:
			sig := s.(syscall.Signal)
			if sig == syscall.SIGWINCH {
				if w, h, err := term.GetSize(int(os.Stdout.Fd())); err == nil && opts.TTY {
					proc.Resize(uint16(h), uint16(w))
				}
				continue
			}
			proc.Signal(sig)
		case <-timeoutC:
			sb.Close()
			return &ExitError{Code: exitTimeout, Err: fmt.Errorf("command timed out after %ds; sandbox stopped", timeout)}
		case <-sb.Done():
			return failure(errors.New("the sandbox stopped while the command was running"))
		}
	}
}

// collectEnv reads -e and --env-file values in order. "-e KEY" copies the
// host's value and is an error when the host has none.
func collectEnv(flags, files []string) ([]string, error) {
	var out []string
	for _, path := range files {
		fh, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("--env-file: %w", err)
		}
		sc := bufio.NewScanner(fh)
		n := 0
		for sc.Scan() {
			n++
			line := strings.TrimSpace(sc.Text())
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			kv, err := envEntry(line)
			if err != nil {
				fh.Close()
				return nil, fmt.Errorf("--env-file %s:%d: %w", path, n, err)
			}
			out = append(out, kv)
		}
		err = sc.Err()
		fh.Close()
		if err != nil {
			return nil, fmt.Errorf("--env-file %s: %w", path, err)
		}
	}
	for _, e := range flags {
		kv, err := envEntry(e)
		if err != nil {
			return nil, fmt.Errorf("-e: %w", err)
		}
		out = append(out, kv)
	}
	return out, nil
}

func envEntry(s string) (string, error) {
	k, v, hasValue := strings.Cut(s, "=")
	if k == "" || strings.ContainsAny(k, " \t\x00") {
		return "", fmt.Errorf("%q: want KEY=VALUE or KEY", s)
	}
	if strings.ContainsRune(v, 0) {
		return "", fmt.Errorf("%q: value contains a NUL byte", k)
	}
	if !hasValue {
		hv, ok := os.LookupEnv(k)
		if !ok {
			return "", fmt.Errorf("%s is not set on the host", k)
		}
		v = hv
	}
	return k + "=" + v, nil
}
