package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/snapshot"
	"matchlock.dev/matchlock/state"
	"matchlock.dev/matchlock/supervisor"
)

func init() {
	register(newSnapshotCmd)
	register(newForkCmd)
}

// restoreOptions turns `run --snapshot NAME` into Options.RestoreFrom. For
// a --rm run this process holds the snapshot while the sandbox lives
// (release when done); a long-lived sandbox's supervisor holds it itself.
func restoreOptions(f *runFlags, opts *sandbox.Options) (release func(), err error) {
	release = func() {}
	if f.snapshot == "" {
		return release, nil
	}
	if f.image != "" {
		return nil, errors.New("--snapshot restores the snapshot's image: drop --image")
	}
	changed := func(n string) bool { return f.changed != nil && f.changed(n) }
	for _, n := range []string{"kernel", "volume", "workspace"} {
		if changed(n) {
			return nil, fmt.Errorf("--%s cannot be combined with --snapshot", n)
		}
	}
	db, err := openState()
	if err != nil {
		return nil, err
	}
	defer db.Close()
	store := snapshot.Open(db)
	e, err := getSnapshot(store, f.snapshot)
	if err != nil {
		return nil, err
	}
	info, err := e.Description()
	if err != nil {
		return nil, err
	}
	// Resources are the snapshot's; a flag that names others is an error
	// (reported by the restore).
	if !changed("cpus") {
		opts.CPUs = info.CPUs
	}
	if !changed("memory") {
		opts.MemoryMiB = info.MemoryMiB
	}
	if !changed("disk-size") {
		opts.DiskSizeMiB = info.DiskSizeMiB
	}
	f.image, opts.Image = info.Image, info.Image
	if !f.rm || f.detach {
		return release, nil // the supervisor acquires it (supervisor.Config.Snapshot)
	}
	opts.ID = sandbox.NewID()
	// The reference outlives this connection to the database (closed on
	// return): release it with a fresh one.
	dir, _, err := store.Acquire(f.snapshot, opts.ID)
	if err != nil {
		return nil, err
	}
	opts.RestoreFrom = dir
	return func() {
		if db, err := openState(); err == nil {
			db.ReleaseSnapshot(f.snapshot, opts.ID)
			db.Close()
		}
	}, nil
}

// getSnapshot is store.Get, with the user's message for an unknown name.
func getSnapshot(store *snapshot.Store, name string) (*snapshot.Entry, error) {
	e, err := store.Get(name)
	if errors.Is(err, state.ErrNoSnapshot) {
		return nil, noSnapshot(name)
	}
	return e, err
}

// noSnapshot is the error for a snapshot name that names none.
func noSnapshot(name string) error {
	return fmt.Errorf("no snapshot %q: see 'matchlock snapshot ls'", name)
}

func newSnapshotCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Snapshot running sandboxes; list, inspect and remove snapshots",
		Long: `A snapshot holds a running sandbox's memory, device state and writable
layer, taken at a consistent point: the sandbox pauses for a moment and
continues. 'matchlock run --snapshot NAME' starts any number of independent
sandboxes from it, each with its own id, writable layer, MAC, hostname,
network policy and secrets, its clock set and its kernel RNG reseeded.
User-space state is copied as it was, random seeds and secrets made before
the snapshot included (see docs/snapshots.md).

Snapshots are stored under the cache directory (snapshots/NAME).`,
	}
	cmd.AddCommand(newSnapshotCreateCmd(), newSnapshotListCmd(), newSnapshotInspectCmd(), newSnapshotRmCmd())
	return cmd
}

func newSnapshotCreateCmd() *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "create ID [--name NAME]",
		Short: "Snapshot a running sandbox (it pauses briefly and continues)",
		Long: `Snapshot a running sandbox. It is refused while the sandbox has exec or file
transfers in flight (a snapshot then could lose or repeat their data): wait
until they end. Processes started in the background are fine: they are
frozen across the snapshot and continue in the sandbox and in every copy.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if name == "" {
				name = snapshot.NewName("snap-")
			}
			if snapshot.Reserved(name) {
				return fmt.Errorf("snapshot create: --name %q: the prefixes %s and %s are reserved for boot and fork snapshots", name, snapshot.BootPrefix, snapshot.ForkPrefix)
			}
			if !snapshot.ValidName(name) {
				return fmt.Errorf("snapshot create: --name %q: want letters, digits, '.', '_' or '-', at most 64, starting with a letter or digit", name)
			}
			id, err := runningSandbox(args[0])
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Minute)
			defer cancel()
			row, err := supervisor.Snapshot(ctx, id, name)
			if err != nil {
				if strings.Contains(err.Error(), state.ErrSnapshotExists.Error()) {
					return fmt.Errorf("snapshot create: a snapshot %s exists already: pick another --name or 'matchlock snapshot rm %s'", name, name)
				}
				return fmt.Errorf("snapshot create %s: %w", id, err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), row.Name)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "name of the snapshot (default: snap- and 8 hex digits)")
	return cmd
}

func newSnapshotListCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List snapshots with their sizes and users",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			db, err := openState()
			if err != nil {
				return err
			}
			defer db.Close()
			es, err := snapshot.Open(db).List()
			if err != nil {
				return err
			}
			w := cmd.OutOrStdout()
			if asJSON {
				if es == nil {
					es = []*snapshot.Entry{}
				}
				return writeJSON(w, es)
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSOURCE\tIMAGE\tSIZE\tMEMORY\tLAYER\tUSERS\tCREATED")
			for _, e := range es {
				name := e.Name
				if e.Auto {
					name += " (fork)"
				} else if strings.HasPrefix(name, snapshot.BootPrefix) {
					name += " (boot)"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", name, e.Source, e.Image, humanBytes(e.Size),
					humanBytes(e.Files["memory"]), humanBytes(e.Files[sandbox.SnapshotLayerFile]), len(e.Users), ago(e.Created))
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func humanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.0f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func newSnapshotInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect NAME",
		Short: "Show a snapshot's description, files and users as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			db, err := openState()
			if err != nil {
				return err
			}
			defer db.Close()
			e, err := getSnapshot(snapshot.Open(db), args[0])
			if err != nil {
				return err
			}
			return writeJSON(cmd.OutOrStdout(), e)
		},
	}
}

func newSnapshotRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "rm NAME...",
		Short: "Remove snapshots (refused while sandboxes restored from them run)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			db, err := openState()
			if err != nil {
				return err
			}
			defer db.Close()
			store := snapshot.Open(db)
			for _, name := range args {
				if err := store.Remove(name); err != nil {
					if errors.Is(err, state.ErrNoSnapshot) {
						return noSnapshot(name)
					}
					return fmt.Errorf("snapshot rm: %w", err)
				}
				fmt.Fprintln(cmd.OutOrStdout(), name)
			}
			return nil
		},
	}
}

func newForkCmd() *cobra.Command {
	var n int
	var allow []string
	cmd := &cobra.Command{
		Use:   "fork ID [-n N]",
		Short: "Fork a running sandbox live into N new sandboxes",
		Long: `Fork a running sandbox: it pauses briefly and continues, and N new sandboxes
start from that moment, each with its own id, writable layer, MAC,
hostname, clock and kernel RNG; they keep the source's network policy and
secrets unless --allow-host replaces the allow list. Published ports are
not copied. Prints the new ids, one a line, once all of them run.

Refused while the source has exec or file transfers in flight.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if n < 1 || n > supervisor.MaxForks {
				return fmt.Errorf("fork: -n %d: want 1 to %d", n, supervisor.MaxForks)
			}
			id, err := runningSandbox(args[0])
			if err != nil {
				return err
			}
			var allowHosts *[]string
			if cmd.Flags().Changed("allow-host") {
				a := splitLists(allow)
				allowHosts = &a
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Minute)
			defer cancel()
			ids, err := supervisor.Fork(ctx, id, n, allowHosts)
			printIDs(cmd.OutOrStdout(), ids)
			if err != nil {
				return fmt.Errorf("fork %s: %w", id, err)
			}
			return nil
		},
	}
	cmd.Flags().IntVarP(&n, "n", "n", 1, "number of forks")
	cmd.Flags().StringArrayVar(&allow, "allow-host", nil, "replace the forks' allow list (repeatable, comma lists)")
	return cmd
}

func printIDs(w io.Writer, ids []string) {
	for _, id := range ids {
		fmt.Fprintln(w, id)
	}
}

// boot starts the sandbox of a --rm run: from a boot snapshot (warm start)
// unless --cold, or restored from --snapshot (already in opts). Long-lived
// sandboxes (run -d) always boot: a booted VM's RAM is shared memory the
// host copies for a fast snapshot, while a restored VM's RAM is a private
// mapping of its snapshot, which a snapshot must carry in the migration
// stream (slower, and its forks share no pages).
func boot(ctx context.Context, f *runFlags, opts sandbox.Options) (*sandbox.Sandbox, func(), error) {
	if f.cold || opts.RestoreFrom != "" {
		sb, err := sandbox.New(ctx, opts)
		return sb, func() {}, err
	}
	db, err := openState()
	if err != nil {
		sb, err := sandbox.New(ctx, opts)
		return sb, func() {}, err
	}
	sb, release, err := snapshot.Open(db).Warm(ctx, opts)
	return sb, func() { release(); db.Close() }, err
}
