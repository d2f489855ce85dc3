package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/state"
	"matchlock.dev/matchlock/supervisor"
)

func init() {
	register(newExecCmd)
	register(newListCmd)
	register(newInspectCmd)
	register(newKillCmd)
	register(newRmCmd)
	register(newPruneCmd)
	register(newGCCmd)
	register(newLogsCmd)
	register(newSuperviseCmd)
}

func openState() (*state.DB, error) {
	db, err := state.OpenDefault()
	if err != nil {
		return nil, fmt.Errorf("open state: %w", err)
	}
	return db, nil
}

// lookup finds a sandbox by id, id prefix or name, refreshing crash status.
func lookup(db *state.DB, ref string) (*state.Record, error) {
	if _, err := db.Refresh(); err != nil {
		return nil, err
	}
	r, err := db.Get(ref)
	if errors.Is(err, state.ErrNotFound) {
		return nil, fmt.Errorf("no sandbox %q: see 'matchlock list'", ref)
	}
	return r, err
}

// findSandbox is lookup over a connection of its own.
func findSandbox(ref string) (*state.Record, error) {
	db, err := openState()
	if err != nil {
		return nil, err
	}
	defer db.Close()
	return lookup(db, ref)
}

// active says whether r's supervisor is (meant to be) up.
func active(r *state.Record) bool {
	return r.Status == state.StatusRunning || r.Status == state.StatusStarting
}

// ended says whether r has stopped or crashed: what rm --stopped and prune remove.
func ended(r *state.Record) bool {
	return r.Status == state.StatusStopped || r.Status == state.StatusCrashed
}

func newExecCmd() *cobra.Command {
	var (
		env        []string
		dir, user  string
		stdin, tty bool
	)
	cmd := &cobra.Command{
		Use:   "exec [-i] [-t] [-w DIR] [-u USER] [-e K=V] ID [--] COMMAND [ARG...]",
		Short: "Run a command in a running sandbox",
		Long: `Run a command in a running sandbox with the semantics of 'run': streaming
output, exit codes, PTY, signals. Flags after the command word belong to the
command. Processes the command starts in the background keep running after
it returns, until the sandbox stops.`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := findSandbox(args[0])
			if err != nil {
				return failure(err)
			}
			if r.Status != state.StatusRunning {
				return failure(fmt.Errorf("sandbox %s is %s, not running: start a new one with 'matchlock run'", r.ID, r.Status))
			}
			extra, err := collectEnv(env, nil)
			if err != nil {
				return failure(err)
			}
			ctx := context.Background()
			sb, err := supervisor.Dial(ctx, r.ID)
			if err != nil {
				return failure(err)
			}
			defer sb.Conn().Close()
			info, err := supervisor.GetInfo(ctx, sb)
			if err != nil {
				return failure(err)
			}
			spec := sandbox.ProcessSpec{Args: args[1:], Env: extra, Dir: dir, User: user, Stdin: stdin, TTY: tty}
			if tty {
				t := os.Getenv("TERM")
				if t == "" {
					t = "xterm"
				}
				spec.Env = append([]string{"TERM=" + t}, spec.Env...)
			}
			empty := ""
			spec.Entrypoint = &empty // exec runs the command as given
			eo, err := spec.Resolve(info.Image)
			if err != nil {
				return failure(err)
			}
			sigs := make(chan os.Signal, 8)
			signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGWINCH)
			defer signal.Stop(sigs)
			return attach(ctx, sb, eo, sigs, nil, 0)
		},
	}
	fl := cmd.Flags()
	fl.SetInterspersed(false)
	fl.StringArrayVarP(&env, "env", "e", nil, "set an environment variable (KEY=VALUE, or KEY to copy it from the host)")
	fl.StringVarP(&dir, "workdir", "w", "", "working directory (default: image WORKDIR)")
	fl.StringVarP(&user, "user", "u", "", "user[:group] (default: image USER)")
	fl.BoolVarP(&stdin, "interactive", "i", false, "pipe standard input to the command")
	fl.BoolVarP(&tty, "tty", "t", false, "allocate a pseudo-terminal")
	return cmd
}

func newListCmd() *cobra.Command {
	var asJSON, running bool
	cmd := &cobra.Command{
		Use:     "list",
		Aliases: []string{"ls"},
		Short:   "List sandboxes",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			db, err := openState()
			if err != nil {
				return err
			}
			defer db.Close()
			rs, err := db.Refresh()
			if err != nil {
				return err
			}
			var out []*state.Record
			for _, r := range rs {
				if !running || r.Status == state.StatusRunning {
					out = append(out, r)
				}
			}
			w := cmd.OutOrStdout()
			if asJSON {
				if out == nil {
					out = []*state.Record{}
				}
				return writeJSON(w, out)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tSTATUS\tIMAGE\tCREATED")
			for _, r := range out {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.ID, r.Name, r.Status, r.Image, ago(r.Created))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&running, "running", false, "only running sandboxes")
	return cmd
}

func ago(t time.Time) string {
	d := time.Since(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return t.Format("2006-01-02")
}

func newInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect ID",
		Short: "Show a sandbox's configuration and state as JSON (never secret values)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := findSandbox(args[0])
			if err != nil {
				return err
			}
			out := map[string]any{"sandbox": r, "dir": sandbox.SandboxDir(r.ID)}
			if r.Status == state.StatusRunning {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if sb, err := supervisor.Dial(ctx, r.ID); err == nil {
					if info, err := supervisor.GetInfo(ctx, sb); err == nil {
						out["runtime"] = info
					}
					sb.Conn().Close()
				}
			}
			if fi, err := os.Stat(filepath.Join(sandbox.SandboxDir(r.ID), "upper.ext4")); err == nil {
				if st, ok := fi.Sys().(*syscall.Stat_t); ok {
					out["writable_layer_bytes"] = st.Blocks * 512
				}
			}
			return writeJSON(cmd.OutOrStdout(), out)
		},
	}
}

// stop asks a running sandbox to stop; after grace it kills the
// supervisor (QEMU dies with it).
func stop(db *state.DB, r *state.Record, grace time.Duration) error {
	if !active(r) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := supervisor.RequestShutdown(ctx, r.ID); err == nil {
		waitGone(r.SupervisorPID, r.SupervisorStart, grace)
	}
	if state.Alive(r.SupervisorPID, r.SupervisorStart) {
		syscall.Kill(r.SupervisorPID, syscall.SIGKILL)
		waitGone(r.SupervisorPID, r.SupervisorStart, grace)
	}
	return db.Finish(r.ID, state.StatusStopped, nil, "killed")
}

func newKillCmd() *cobra.Command {
	var all bool
	var timeout int
	cmd := &cobra.Command{
		Use:   "kill ID... | --all",
		Short: "Stop running sandboxes (gracefully, then forced after --timeout)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if all == (len(args) > 0) {
				return errors.New("kill: give sandbox IDs or --all")
			}
			running := func(r *state.Record) bool { return r.Status == state.StatusRunning }
			return forEachTarget(cmd.OutOrStdout(), args, all, running, func(db *state.DB, r *state.Record) error {
				if err := stop(db, r, time.Duration(timeout)*time.Second); err != nil {
					return fmt.Errorf("kill %s: %w", r.ID, err)
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "every running sandbox")
	cmd.Flags().IntVar(&timeout, "timeout", 10, "seconds to wait before forcing")
	return cmd
}

// forEachTarget runs act on the sandboxes named by args (with all: every
// one pick selects) and prints the id of each it acted on. Every name is
// looked up before act runs at all; the first error stops the loop.
func forEachTarget(w io.Writer, args []string, all bool, pick func(*state.Record) bool, act func(*state.DB, *state.Record) error) error {
	db, err := openState()
	if err != nil {
		return err
	}
	defer db.Close()
	targets, err := resolveTargets(db, args, all, pick)
	if err != nil {
		return err
	}
	for _, r := range targets {
		if err := act(db, r); err != nil {
			return err
		}
		fmt.Fprintln(w, r.ID)
	}
	return nil
}

func resolveTargets(db *state.DB, args []string, all bool, pick func(*state.Record) bool) ([]*state.Record, error) {
	if all {
		rs, err := db.Refresh()
		if err != nil {
			return nil, err
		}
		var out []*state.Record
		for _, r := range rs {
			if pick(r) {
				out = append(out, r)
			}
		}
		return out, nil
	}
	var out []*state.Record
	for _, a := range args {
		r, err := lookup(db, a)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// remove deletes a stopped sandbox's files and row.
func remove(db *state.DB, r *state.Record) error {
	if err := os.RemoveAll(sandbox.SandboxDir(r.ID)); err != nil {
		return err
	}
	return db.Delete(r.ID)
}

func newRmCmd() *cobra.Command {
	var stopped, force bool
	cmd := &cobra.Command{
		Use:   "rm ID... | --stopped",
		Short: "Remove sandboxes (a running one only with --force)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if stopped == (len(args) > 0) {
				return errors.New("rm: give sandbox IDs or --stopped")
			}
			return forEachTarget(cmd.OutOrStdout(), args, stopped, ended, func(db *state.DB, r *state.Record) error {
				if active(r) {
					if !force {
						return fmt.Errorf("rm %s: sandbox is %s: 'matchlock kill %s' first, or rm --force", r.ID, r.Status, r.ID)
					}
					if err := stop(db, r, 5*time.Second); err != nil {
						return err
					}
				}
				if err := remove(db, r); err != nil {
					return fmt.Errorf("rm %s: %w", r.ID, err)
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&stopped, "stopped", false, "every stopped or crashed sandbox")
	cmd.Flags().BoolVarP(&force, "force", "f", false, "kill running sandboxes first")
	return cmd
}

func newPruneCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "prune",
		Short: "Remove every stopped or crashed sandbox",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			db, err := openState()
			if err != nil {
				return err
			}
			defer db.Close()
			rs, err := db.Refresh()
			if err != nil {
				return err
			}
			n := 0
			for _, r := range rs {
				if ended(r) {
					if err := remove(db, r); err != nil {
						return err
					}
					n++
				}
			}
			fmt.Fprintf(cmd.OutOrStdout(), "removed %d sandbox(es)\n", n)
			return nil
		},
	}
}

func newGCCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "gc",
		Short: "Reclaim what crashed sandboxes leaked: processes, disks, sockets",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			db, err := openState()
			if err != nil {
				return err
			}
			defer db.Close()
			rs, err := db.Refresh()
			if err != nil {
				return err
			}
			known := map[string]bool{}
			w := cmd.OutOrStdout()
			for _, r := range rs {
				known[r.ID] = true
				if r.Status != state.StatusCrashed {
					continue
				}
				// QEMU dies with its supervisor (Pdeathsig); kill any
				// straggler whose command line names this sandbox.
				for _, pid := range vmmPids(sandbox.SandboxDir(r.ID)) {
					syscall.Kill(pid, syscall.SIGKILL)
					fmt.Fprintf(w, "killed leaked VMM %d of %s\n", pid, r.ID)
				}
				if err := remove(db, r); err != nil {
					return err
				}
				fmt.Fprintf(w, "reclaimed crashed sandbox %s\n", r.ID)
			}
			ents, _ := os.ReadDir(filepath.Dir(sandbox.SandboxDir("x")))
			for _, e := range ents {
				if known[e.Name()] || !strings.HasPrefix(e.Name(), "vm-") {
					continue
				}
				dir := sandbox.SandboxDir(e.Name())
				if len(vmmPids(dir)) > 0 {
					continue // a --rm sandbox in use right now
				}
				if err := os.RemoveAll(dir); err != nil {
					return err
				}
				fmt.Fprintf(w, "removed leaked files of %s\n", e.Name())
			}
			return nil
		},
	}
}

// vmmPids lists QEMU processes whose command line mentions dir.
func vmmPids(dir string) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), "qemu-system") && strings.Contains(string(b), dir+"/") {
			out = append(out, pid)
		}
	}
	return out
}

func waitGone(pid int, start uint64, max time.Duration) {
	deadline := time.Now().Add(max)
	for state.Alive(pid, start) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

func newLogsCmd() *cobra.Command {
	var follow, console bool
	cmd := &cobra.Command{
		Use:   "logs ID [-f]",
		Short: "Print a sandbox's command output (--console: the VM console)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			db, err := openState()
			if err != nil {
				return err
			}
			defer db.Close()
			r, err := lookup(db, args[0])
			if err != nil {
				return err
			}
			name := supervisor.OutputLogName
			if console {
				name = supervisor.ConsoleLogName
			}
			f, err := os.Open(filepath.Join(sandbox.SandboxDir(r.ID), name))
			if errors.Is(err, os.ErrNotExist) {
				if !follow {
					return nil
				}
			} else if err != nil {
				return err
			} else {
				defer f.Close()
			}
			w := cmd.OutOrStdout()
			if f != nil {
				io.Copy(w, f)
			}
			if !follow {
				return nil
			}
			// Follow until the sandbox stops.
			for {
				if f == nil {
					f, _ = os.Open(filepath.Join(sandbox.SandboxDir(r.ID), name))
				}
				if f != nil {
					io.Copy(w, f)
				}
				cur, err := db.Get(r.ID)
				if err != nil || !active(cur) {
					if f != nil {
						io.Copy(w, f)
					}
					return nil
				}
				if !state.Alive(cur.SupervisorPID, cur.SupervisorStart) {
					return nil
				}
				time.Sleep(200 * time.Millisecond)
			}
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing until the sandbox stops")
	cmd.Flags().BoolVar(&console, "console", false, "the VM's serial console (kernel and agent messages)")
	return cmd
}

func newSuperviseCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "supervise",
		Short:  "Internal: own one long-lived sandbox (started by run --rm=false / -d)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			supervisor.ImageSource = imageSource
			return supervisor.Main()
		},
	}
}
