package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/rpc"
)

func init() { register(newRPCCmd) }

type rpcFlags struct {
	kernel       string
	accel        string
	maxSandboxes int
	maxInFlight  int
	pull         string
}

func newRPCCmd() *cobra.Command {
	f := &rpcFlags{}
	cmd := &cobra.Command{
		Use:   "rpc",
		Short: "Serve the JSON-RPC API on standard input and output",
		Long: `Serve matchlock's JSON-RPC 2.0 API on standard input and output, one JSON
message per line. This is what the Go and Python SDKs run; see docs/rpc.md.

Every sandbox created in the session is closed when standard input reaches
EOF or the process gets SIGINT, SIGTERM or SIGHUP. Notices go to standard
error.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runRPC(cmd.Context(), f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.kernel, "kernel", "", "guest kernel (default: $MATCHLOCK_KERNEL, else the built one)")
	fl.StringVar(&f.accel, "accel", "", "acceleration: kvm or tcg (default: detect)")
	fl.StringVar(&f.pull, "pull", "missing", "pull policy for create's images: always, missing or never")
	fl.IntVar(&f.maxSandboxes, "max-sandboxes", rpc.DefaultMaxSandboxes, "sandboxes one session may run at once")
	fl.IntVar(&f.maxInFlight, "max-in-flight", rpc.DefaultMaxInFlight, "requests one session may have in flight")
	return cmd
}

func runRPC(ctx context.Context, f *rpcFlags) error {
	switch f.pull {
	case "always", "missing", "never":
	default:
		return failure(fmt.Errorf("rpc: --pull %q: want always, missing or never", f.pull))
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	// A client that goes away must make writes fail (and the session end
	// cleanly, removing its sandboxes), not kill us with SIGPIPE.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)

	err := rpc.Serve(ctx, os.Stdin, os.Stdout, rpc.Config{
		Images: imageSource(f.pull),
		Kernel: f.kernel, Accel: f.accel, Log: os.Stderr,
		MaxSandboxes: f.maxSandboxes, MaxInFlight: f.maxInFlight,
	})
	if err != nil && !errors.Is(err, context.Canceled) {
		return failure(err)
	}
	return nil
}
