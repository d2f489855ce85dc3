// Package build runs Dockerfile builds: it boots a builder micro-VM (an
// image holding BuildKit and runc, see scripts/build-builder.sh), sends it
// the build context and the base images from matchlock's store, drives
// BuildKit inside the VM over its unix socket, and imports the resulting
// image into the store. See docs/build.md.
package build

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"

	"matchlock.dev/matchlock/image"
	"matchlock.dev/matchlock/internal/tailbuf"
	"matchlock.dev/matchlock/netstack"
	"matchlock.dev/matchlock/sandbox"
)

// Options describes one build.
type Options struct {
	ContextDir string   // the build context (a host directory)
	Dockerfile string   // default: ContextDir/Dockerfile
	Tag        string   // name of the result in the store
	BuildArgs  []string // KEY=VALUE, or KEY to take the host's $KEY
	Target     string   // stage to build; default the last
	NoCache    bool

	// Progress receives BuildKit's plain progress output; nil discards it.
	Progress io.Writer
	// Notice receives one-line notices for the user.
	Notice func(string)

	// Network of the builder VM, as for run: sealed unless AllowHosts.
	AllowHosts   []string
	AllowPrivate []string
	AddHosts     []string
	Secrets      []sandbox.Secret
	NetLog       func(netstack.Event)

	Pull sandbox.PullPolicy // for base images; default PullMissing

	Kernel, Accel string
	CPUs          int // default 1
	MemoryMiB     int // default 1024
	DiskSizeMiB   int // builder's writable layer; default 16384 (sparse)
}

// Timings are the phases of a build.
type Timings struct {
	Boot, Daemon, Upload, Build, Export, Total time.Duration
}

func (t Timings) String() string {
	r := func(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'f', 1, 64) + "s" }
	return fmt.Sprintf("total %s: builder boot %s, buildkitd ready %s, upload %s, build %s, export+import %s",
		r(t.Total), r(t.Boot), r(t.Daemon), r(t.Upload), r(t.Build), r(t.Export))
}

// Result is a finished build.
type Result struct {
	Image   *image.Image
	Timings Timings
}

// StepError is a build that failed; for a failing RUN, Step is its
// instruction and ExitCode the process's exit code.
type StepError struct {
	Step     string // "[stage 2/3] RUN make", "" when unknown
	Location string // "Dockerfile:7", "" when unknown
	ExitCode int    // -1 when the failure is not a process's exit
	Message  string // BuildKit's error line
}

func (e *StepError) Error() string {
	var b strings.Builder
	b.WriteString("build failed")
	if e.Step != "" {
		b.WriteString(" at " + e.Step)
	}
	if e.Location != "" {
		b.WriteString(" (" + e.Location + ")")
	}
	if e.ExitCode >= 0 {
		fmt.Fprintf(&b, ": exit code %d", e.ExitCode)
	} else if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	return b.String()
}

const (
	sock     = "/run/buildkit/buildkitd.sock"
	guestEnv = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	outTar   = "/out/image.tar"
)

type base struct {
	ref, key, store string
	img             *image.Image
}

// Run builds and imports the image; on success the store names it Tag.
func Run(ctx context.Context, o Options) (*Result, error) {
	t0 := time.Now()
	notice := o.Notice
	if notice == nil {
		notice = func(string) {}
	}
	progress := o.Progress
	if progress == nil {
		progress = io.Discard
	}
	if o.Tag == "" {
		return nil, errors.New("build: -t TAG is required")
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 1024
	}
	if o.DiskSizeMiB == 0 {
		o.DiskSizeMiB = 16 << 10
	}
	if o.CPUs == 0 {
		o.CPUs = 1
	}
	if o.Pull == "" {
		o.Pull = sandbox.PullMissing
	}
	ctxDir, err := filepath.Abs(o.ContextDir)
	if err != nil {
		return nil, err
	}
	if fi, err := os.Stat(ctxDir); err != nil {
		return nil, fmt.Errorf("build context: %w", err)
	} else if !fi.IsDir() {
		return nil, fmt.Errorf("build context %s: not a directory", o.ContextDir)
	}
	dfPath := o.Dockerfile
	if dfPath == "" {
		dfPath = filepath.Join(ctxDir, "Dockerfile")
	}
	dfBytes, err := os.ReadFile(dfPath)
	if err != nil {
		return nil, fmt.Errorf("dockerfile: %w", err)
	}
	args := map[string]string{}
	var argOpts []string
	for _, a := range o.BuildArgs {
		k, v, ok := strings.Cut(a, "=")
		if !ok {
			hv, set := os.LookupEnv(k)
			if !set {
				continue // as docker: an unset KEY is not passed
			}
			v = hv
		}
		if k == "" {
			return nil, fmt.Errorf("--build-arg %q: want KEY=VALUE or KEY", a)
		}
		args[k] = v
		argOpts = append(argOpts, "build-arg:"+k+"="+v)
	}
	df := ParseDockerfile(dfBytes, args)
	if df.SyntaxIgnored != "" {
		notice(fmt.Sprintf("ignoring '# syntax=%s': matchlock always uses BuildKit's built-in Dockerfile frontend", df.SyntaxIgnored))
	}
	ig, err := ReadIgnore(ctxDir)
	if err != nil {
		return nil, err
	}

	st, err := image.OpenDefault()
	if err != nil {
		return nil, err
	}
	defer st.Close()
	var bases []base
	for i, ref := range df.Images {
		img, err := resolveBase(ctx, st, ref, o.Pull)
		if err != nil {
			return nil, err
		}
		key, err := contextKey(ref)
		if err != nil {
			return nil, err
		}
		bases = append(bases, base{ref: ref, key: key, store: "base" + strconv.Itoa(i), img: img})
	}
	builderTag, err := BuilderImage(ctx, st)
	if err != nil {
		return nil, err
	}
	lock, disk, err := lockCache(ctx, notice, true)
	if err != nil {
		return nil, err
	}
	defer lock.release()

	res := &Result{}
	tBoot := time.Now()
	sb, err := sandbox.New(ctx, sandbox.Options{
		Image: builderTag, Images: &sandbox.StoreSource{Policy: sandbox.PullNever},
		Kernel: o.Kernel, Accel: o.Accel, CPUs: o.CPUs, MemoryMiB: o.MemoryMiB, DiskSizeMiB: o.DiskSizeMiB,
		Hostname:   "matchlock-builder",
		AllowHosts: o.AllowHosts, AllowPrivate: o.AllowPrivate, AddHosts: o.AddHosts, Secrets: o.Secrets,
		NetLog: o.NetLog, Notice: o.Notice,
		Disks: []sandbox.DiskMount{{Path: disk, Target: "/var/lib/buildkit"}},
	})
	if err != nil {
		return nil, fmt.Errorf("builder VM: %w", err)
	}
	defer sb.Close()
	res.Timings.Boot = time.Since(tBoot)

	// buildkitd runs for the whole build; its log is kept for errors.
	tDaemon := time.Now()
	daemonLog := tailbuf.New(16 << 10)
	daemon, err := sb.Exec(ctx, sandbox.ExecOptions{Env: []string{guestEnv}, Argv: []string{
		"buildkitd", "--root", "/var/lib/buildkit", "--addr", "unix://" + sock,
		"--oci-worker=true", "--containerd-worker=false", "--oci-worker-snapshotter=overlayfs",
		"--oci-worker-binary=runc", "--oci-worker-net=host",
		"--oci-worker-gc", "--oci-worker-gc-keepstorage=" + strconv.Itoa(gcKeepMB),
	}})
	if err != nil {
		return nil, fmt.Errorf("start buildkitd: %w", err)
	}
	defer daemon.Close()
	go io.Copy(daemonLog, daemon.Stdout())
	go io.Copy(daemonLog, daemon.Stderr())
	daemonDone := make(chan struct{})
	go func() { daemon.Wait(ctx); close(daemonDone) }()
	defer func() { // a clean stop keeps the cache's metadata consistent
		daemon.Signal(syscall.SIGTERM)
		select {
		case <-daemonDone:
		case <-time.After(5 * time.Second):
		}
	}()

	// Uploads, while buildkitd starts.
	tUp := time.Now()
	var upWG sync.WaitGroup
	upErrs := make([]error, 2+len(bases))
	upWG.Add(len(upErrs))
	go func() {
		defer upWG.Done()
		upErrs[0] = upload(ctx, sb, "/ctx", func(w io.Writer) error {
			_, err := WriteContext(ctxDir, ig, w)
			return err
		})
	}()
	go func() {
		defer upWG.Done()
		upErrs[1] = upload(ctx, sb, "/df", func(w io.Writer) error {
			tw := tar.NewWriter(w)
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "Dockerfile", Mode: 0o644, Size: int64(len(df.Text)), ModTime: time.Now()}); err != nil {
				return err
			}
			tw.Write(df.Text)
			return tw.Close()
		})
	}()
	for i, b := range bases {
		go func() {
			defer upWG.Done()
			upErrs[2+i] = upload(ctx, sb, "/oci/"+b.store, func(w io.Writer) error { return st.WriteOCILayout(b.img, "", w) })
		}()
	}
	upWG.Wait()
	if err := errors.Join(upErrs...); err != nil {
		return nil, fmt.Errorf("upload to the builder: %w", err)
	}
	res.Timings.Upload = time.Since(tUp)

	// Wait for the socket (buildkitd takes seconds to start under TCG).
	if _, serr, code, err := run(ctx, sb, "i=0; while [ ! -S "+sock+" ]; do i=$((i+1)); [ $i -gt 1200 ] && exit 1; sleep 0.05; done"); err != nil || code != 0 {
		select {
		case <-daemonDone:
			return nil, fmt.Errorf("buildkitd exited: %s", lastLines(daemonLog.String(), 5))
		default:
		}
		return nil, fmt.Errorf("buildkitd did not come up (%v %s): %s", err, serr, lastLines(daemonLog.String(), 5))
	}
	res.Timings.Daemon = time.Since(tDaemon)

	argv := []string{"buildctl", "--addr", "unix://" + sock, "build", "--progress=plain",
		"--frontend", "dockerfile.v0", "--local", "context=/ctx", "--local", "dockerfile=/df",
		"--opt", "filename=Dockerfile",
		"--output", "type=oci,dest=" + outTar + ",compression=uncompressed"}
	if o.Target != "" {
		argv = append(argv, "--opt", "target="+o.Target)
	}
	if o.NoCache {
		argv = append(argv, "--no-cache")
	}
	for _, a := range argOpts {
		argv = append(argv, "--opt", a)
	}
	for _, b := range bases {
		argv = append(argv, "--oci-layout", b.store+"=/oci/"+b.store,
			"--opt", "context:"+b.key+"=oci-layout://"+b.store+"@"+b.img.Digest)
	}
	env := []string{guestEnv}
	for _, s := range o.Secrets {
		// RUN --mount=type=secret,id=NAME sees the placeholder, which the
		// host swaps for the value only on the way to the secret's hosts.
		for _, kv := range sb.Image.Env {
			if k, _, _ := strings.Cut(kv, "="); k == s.Name {
				env = append(env, kv)
				argv = append(argv, "--secret", "id="+s.Name+",env="+s.Name)
			}
		}
	}
	if err := run0(ctx, sb, "mkdir -p /out"); err != nil {
		return nil, err
	}
	tBuild := time.Now()
	proc, err := sb.Exec(ctx, sandbox.ExecOptions{Argv: argv, Env: env})
	if err != nil {
		return nil, fmt.Errorf("buildctl: %w", err)
	}
	errTail := tailbuf.New(64 << 10)
	var outWG sync.WaitGroup
	outWG.Add(2)
	pw := &lockedWriter{w: io.MultiWriter(progress, errTail)}
	go func() { defer outWG.Done(); io.Copy(pw, proc.Stdout()) }()
	go func() { defer outWG.Done(); io.Copy(pw, proc.Stderr()) }()
	status, err := proc.Wait(ctx)
	outWG.Wait()
	proc.Close()
	if err != nil {
		return nil, fmt.Errorf("buildctl: %w", err)
	}
	res.Timings.Build = time.Since(tBuild)
	if status.Code != 0 {
		return nil, parseBuildError(errTail.String(), status.Code)
	}

	tExp := time.Now()
	pr, pwr := io.Pipe()
	go func() {
		_, err := sb.ReadFile(ctx, outTar, pwr)
		pwr.CloseWithError(err)
	}()
	img, err := st.Import(ctx, o.Tag, pr)
	pr.CloseWithError(errors.New("import ended"))
	if err != nil {
		return nil, err
	}
	res.Timings.Export = time.Since(tExp)
	res.Image = img
	res.Timings.Total = time.Since(t0)
	return res, nil
}

// upload streams a tar made by write into a new guest directory.
func upload(ctx context.Context, sb *sandbox.Sandbox, dir string, write func(io.Writer) error) error {
	p, err := sb.Exec(ctx, sandbox.ExecOptions{Env: []string{guestEnv}, Stdin: true,
		Argv: []string{"sh", "-c", `mkdir -p "$1" && exec tar -xf - -C "$1"`, "sh", dir}})
	if err != nil {
		return err
	}
	defer p.Close()
	errb := tailbuf.New(4 << 10)
	go io.Copy(io.Discard, p.Stdout())
	go io.Copy(errb, p.Stderr())
	w := p.Stdin()
	werr := write(w)
	w.Close()
	st, err := p.Wait(ctx)
	if err != nil {
		return err
	}
	if werr != nil {
		return werr
	}
	if st.Code != 0 {
		return fmt.Errorf("%s: tar exited %d: %s", dir, st.Code, strings.TrimSpace(errb.String()))
	}
	return nil
}

func run(ctx context.Context, sb *sandbox.Sandbox, script string) (stdout, stderr string, code int, err error) {
	o, e, st, _, err := sb.Output(ctx, sandbox.ExecOptions{Env: []string{guestEnv}, Argv: []string{"sh", "-c", script}})
	return string(o), string(e), st.Code, err
}

func run0(ctx context.Context, sb *sandbox.Sandbox, script string) error {
	_, e, code, err := run(ctx, sb, script)
	if err == nil && code != 0 {
		err = fmt.Errorf("builder: %q exited %d: %s", script, code, strings.TrimSpace(e))
	}
	return err
}

// resolveBase finds a base image in the store, pulling it when allowed.
func resolveBase(ctx context.Context, st *image.Store, ref string, pull sandbox.PullPolicy) (*image.Image, error) {
	var img *image.Image
	var err error
	if pull != sandbox.PullAlways {
		img, err = st.Resolve(ref)
		if err == nil {
			return img, nil
		}
		if !errors.Is(err, image.ErrNotFound) {
			return nil, fmt.Errorf("base image %s: %w", ref, err)
		}
		if pull == sandbox.PullNever {
			return nil, fmt.Errorf("base image %s is not in the store and --pull=never: import or pull it first", ref)
		}
	}
	img, err = st.Pull(ctx, ref, image.PullOptions{})
	if err != nil {
		return nil, fmt.Errorf("base image %s: %w (import it with 'matchlock image import' when offline)", ref, err)
	}
	return img, nil
}

// contextKey is the name BuildKit's Dockerfile frontend looks up a named
// context under for an image reference: the familiar form, without
// ":latest" (dockerui.Client.NamedContext).
func contextKey(ref string) (string, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return "", fmt.Errorf("base image %q: %w", ref, err)
	}
	repo := image.FamiliarRepo(r.Context().Name())
	switch t := r.(type) {
	case name.Tag:
		if t.TagStr() == "latest" {
			return repo, nil
		}
		return repo + ":" + t.TagStr(), nil
	case name.Digest:
		return repo + "@" + t.DigestStr(), nil
	}
	return repo, nil
}

var (
	exitCodeRe = regexp.MustCompile(`did not complete successfully: exit code: (\d+)`)
	stepRe     = regexp.MustCompile(`^\s*> (\[[^\]]+\] .*?):?\s*$`)
	locRe      = regexp.MustCompile(`^(\S*Dockerfile\S*:\d+)\s*$`)
)

// parseBuildError reads buildctl's plain output for the failing step.
func parseBuildError(out string, code int) *StepError {
	e := &StepError{ExitCode: -1}
	lines := strings.Split(out, "\n")
	for _, l := range lines {
		l = strings.TrimRight(l, "\r")
		if m := stepRe.FindStringSubmatch(l); m != nil {
			e.Step = m[1]
		}
		if m := locRe.FindStringSubmatch(l); m != nil {
			e.Location = m[1]
		}
		if msg, ok := strings.CutPrefix(l, "error: "); ok {
			e.Message = strings.TrimPrefix(msg, "failed to solve: ")
		}
	}
	if m := exitCodeRe.FindStringSubmatch(e.Message); m != nil {
		e.ExitCode, _ = strconv.Atoi(m[1])
	}
	if e.Message == "" {
		e.Message = fmt.Sprintf("buildctl exited %d: %s", code, lastLines(out, 3))
	}
	return e
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

func lastLines(s string, n int) string {
	ls := strings.Split(strings.TrimSpace(s), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, " | ")
}
