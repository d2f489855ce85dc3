package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/build"
	"matchlock.dev/matchlock/image"
	"matchlock.dev/matchlock/sandbox"
)

func init() { register(newBuildCmd) }

type buildFlags struct {
	file, tag, target, progress, pull string
	buildArgs                         []string
	noCache, logNetwork               bool
	allowHost, allowPriv, addHosts    []string
	secrets                           []string
	kernel, accel                     string
	cpus, memory, diskSize            int
}

func newBuildCmd() *cobra.Command {
	f := &buildFlags{}
	cmd := &cobra.Command{
		Use:   "build [-f FILE] -t TAG [flags] CONTEXT | build IMAGE",
		Short: "Build an image from a Dockerfile (BuildKit in a builder VM)",
		Long: `Build an image from a Dockerfile with BuildKit running in a builder micro-VM
and store it as TAG. Base images come from the local store (pulled when
missing, see --pull). The build's network follows run's policy: sealed
unless --allow-host; --secret values reach RUN steps only as placeholders
(RUN --mount=type=secret,id=NAME). BuildKit's cache persists on a disk under
$MATCHLOCK_HOME/builder ('matchlock build prune' resets it). '# syntax='
directives are ignored: the built-in Dockerfile frontend is always used.

With a single IMAGE argument and no -t/-f, pre-builds IMAGE's root disk
(pulling it if needed) so that the next run of it boots at once.

The builder image is made once by scripts/build-builder.sh. See docs/build.md.`,
		Example: `  matchlock build -t app:1 .
  matchlock build -f docker/Dockerfile --build-arg VERSION=2 --target prod -t app:2 .
  matchlock build --allow-host deb.debian.org -t tools .
  matchlock build prune`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return failure(errors.New("build: name the build context directory (for example '.')"))
			}
			if f.tag == "" && f.file == "" {
				if fi, err := os.Stat(args[0]); err == nil && fi.IsDir() {
					return failure(errors.New("build: -t TAG is required (the name of the image to build)"))
				}
				return prebuildImage(cmd.Context(), f, args[0])
			}
			return runBuild(cmd.Context(), f, args[0])
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&f.file, "file", "f", "", "the Dockerfile (default CONTEXT/Dockerfile)")
	fl.StringVarP(&f.tag, "tag", "t", "", "name the built image NAME[:TAG]")
	fl.StringArrayVar(&f.buildArgs, "build-arg", nil, "set a build argument KEY=VALUE (KEY alone: the host's $KEY)")
	fl.StringVar(&f.target, "target", "", "build this stage (default: the last)")
	fl.BoolVar(&f.noCache, "no-cache", false, "do not use BuildKit's cache")
	fl.StringVar(&f.progress, "progress", "auto", "progress output: auto, plain (BuildKit's step log on stderr) or quiet")
	fl.StringVar(&f.pull, "pull", "missing", "pull policy for base images: always, missing or never")
	fl.StringArrayVar(&f.allowHost, "allow-host", nil, "allow RUN steps egress to a host pattern (as run --allow-host)")
	fl.StringArrayVar(&f.allowPriv, "allow-private", nil, "allow a private destination HOST[:PORT] (as run)")
	fl.StringArrayVar(&f.addHosts, "add-host", nil, "resolve NAME to IP on the host side (NAME:IP)")
	fl.StringArrayVar(&f.secrets, "secret", nil, "NAME@hosts or NAME=VALUE@hosts: RUN --mount=type=secret,id=NAME sees a placeholder")
	fl.BoolVar(&f.logNetwork, "log-network", false, "print every connection and refusal of the builder on stderr")
	fl.StringVar(&f.kernel, "kernel", "", "guest kernel (default: $MATCHLOCK_KERNEL, else the built one)")
	fl.StringVar(&f.accel, "accel", "", "acceleration: kvm or tcg (default: detect)")
	fl.IntVar(&f.cpus, "cpus", 1, "virtual CPUs of the builder VM")
	fl.IntVar(&f.memory, "memory", 1024, "builder VM memory in MiB")
	fl.IntVar(&f.diskSize, "disk-size", 16384, "builder VM scratch disk in MiB (sparse; holds the context, bases and result)")
	cmd.AddCommand(newBuildPruneCmd())
	return cmd
}

func newBuildPruneCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "prune",
		Short: "Reset the BuildKit cache (deletes the builder's cache disk)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmdContext(cmd), os.Interrupt, syscall.SIGTERM)
			defer stop()
			freed, err := build.Prune(ctx, func(s string) { fmt.Fprintln(os.Stderr, "matchlock: "+s) })
			if err != nil {
				return failure(err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "build cache reset (%s freed)\n", image.HumanSize(freed))
			return nil
		},
	}
}

func cmdContext(cmd *cobra.Command) context.Context {
	if c := cmd.Context(); c != nil {
		return c
	}
	return context.Background()
}

func runBuild(ctx context.Context, f *buildFlags, contextDir string) error {
	if f.tag == "" {
		return failure(errors.New("build: -t TAG is required"))
	}
	var progress io.Writer
	switch f.progress {
	case "auto", "plain", "tty":
		progress = os.Stderr
	case "quiet":
	default:
		return failure(fmt.Errorf("build: --progress %q: want auto, plain or quiet", f.progress))
	}
	switch f.pull {
	case "always", "missing", "never":
	default:
		return failure(fmt.Errorf("build: --pull %q: want always, missing or never", f.pull))
	}
	secrets, err := parseSecrets(f.secrets)
	if err != nil {
		return failure(err)
	}
	o := build.Options{
		ContextDir: contextDir, Dockerfile: f.file, Tag: f.tag, BuildArgs: f.buildArgs,
		Target: f.target, NoCache: f.noCache, Progress: progress,
		Notice:     func(s string) { fmt.Fprintln(os.Stderr, "matchlock: "+s) },
		AllowHosts: splitLists(f.allowHost), AllowPrivate: splitLists(f.allowPriv), AddHosts: f.addHosts,
		Secrets: secrets, Pull: sandbox.PullPolicy(f.pull),
		Kernel: f.kernel, Accel: f.accel, CPUs: f.cpus, MemoryMiB: f.memory, DiskSizeMiB: f.diskSize,
	}
	if err := sandbox.ValidateNetwork(sandbox.Options{AllowHosts: o.AllowHosts, AllowPrivate: o.AllowPrivate, AddHosts: o.AddHosts, Secrets: o.Secrets}); err != nil {
		return failure(err)
	}
	if f.logNetwork {
		o.NetLog = printNetEvent
	}
	ctx, stop := signal.NotifyContext(ctxOrBackground(ctx), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	res, err := build.Run(ctx, o)
	if err != nil {
		var se *build.StepError
		if errors.As(err, &se) {
			return &ExitError{Code: 1, Err: se}
		}
		if ctx.Err() != nil {
			return &ExitError{Code: exitSignalBase + int(syscall.SIGINT), Err: errors.New("build interrupted")}
		}
		return failure(err)
	}
	fmt.Fprintf(os.Stderr, "matchlock: built %s (%s)\n", res.Image.Name(), res.Timings)
	fmt.Fprintf(os.Stdout, "%s\ndigest: %s\n", res.Image.Name(), res.Image.Digest)
	return nil
}

// prebuildImage is `matchlock build IMAGE`: resolve (pull) the image and
// convert its root disk now.
func prebuildImage(ctx context.Context, f *buildFlags, ref string) error {
	ctx, stop := signal.NotifyContext(ctxOrBackground(ctx), os.Interrupt, syscall.SIGTERM)
	defer stop()
	src := &sandbox.StoreSource{Policy: sandbox.PullPolicy(f.pull)}
	path, _, err := src.Rootfs(ctx, ref)
	if err != nil {
		return failure(err)
	}
	fmt.Fprintf(os.Stdout, "%s: root disk %s\n", ref, path)
	return nil
}

func ctxOrBackground(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
}
