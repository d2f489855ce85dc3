package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/state"
	"matchlock.dev/matchlock/supervisor"
)

func init() {
	register(newPortForwardCmd)
	register(newAllowListCmd)
}

// runningSandbox resolves ref to a running sandbox's id.
func runningSandbox(ref string) (string, error) {
	r, err := findSandbox(ref)
	if err != nil {
		return "", err
	}
	if r.Status != state.StatusRunning {
		return "", fmt.Errorf("sandbox %s is %s, not running", r.ID, r.Status)
	}
	return r.ID, nil
}

func newPortForwardCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "port-forward ID [HOST_IP:]HOST_PORT:GUEST_PORT...",
		Short: "Forward host ports into a running sandbox (bound to 127.0.0.1 unless told otherwise)",
		Long: `Forward host ports into a running sandbox for as long as it runs. Traffic
enters through the sandbox's userspace network stack, never through an
interface the host can see. HOST_PORT 0 picks a free port; the bound
address is printed.`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := runningSandbox(args[0])
			if err != nil {
				return err
			}
			for _, spec := range args[1:] {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				reply, err := supervisor.Control(ctx, id, supervisor.ControlRequest{Kind: supervisor.KindPortForward, Port: spec})
				cancel()
				if err != nil {
					return fmt.Errorf("port-forward %s: %w", spec, err)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s -> %s\n", reply.Addr, spec[strings.LastIndexByte(spec, ':')+1:])
			}
			return nil
		},
	}
}

func newAllowListCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "allow-list add|rm|ls ID [PATTERN...]",
		Short: "Change or show a running sandbox's network allow-list (takes effect at once)",
	}
	op := func(name, short string, needPatterns bool) *cobra.Command {
		return &cobra.Command{
			Use:   name + " ID" + map[bool]string{true: " PATTERN...", false: ""}[needPatterns],
			Short: short,
			Args: func(cmd *cobra.Command, args []string) error {
				if len(args) < 1 || (needPatterns && len(args) < 2) || (!needPatterns && len(args) != 1) {
					return errors.New("usage: matchlock allow-list " + cmd.Use)
				}
				return nil
			},
			RunE: func(cmd *cobra.Command, args []string) error {
				id, err := runningSandbox(args[0])
				if err != nil {
					return err
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				reply, err := supervisor.Control(ctx, id, supervisor.ControlRequest{Kind: supervisor.KindAllowList, Op: name, Patterns: splitLists(args[1:])})
				if err != nil {
					return fmt.Errorf("allow-list %s: %w", name, err)
				}
				w := cmd.OutOrStdout()
				for _, p := range reply.Allow {
					fmt.Fprintln(w, p)
				}
				for _, p := range reply.Private {
					fmt.Fprintln(w, p+" (private)")
				}
				return nil
			},
		}
	}
	cmd.AddCommand(
		op("add", "Allow more host patterns", true),
		op("rm", "Remove host patterns", true),
		op("ls", "Show the allow-list", false),
	)
	return cmd
}
