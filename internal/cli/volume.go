package cli

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/sandbox"
	"matchlock.dev/matchlock/workspace"
)

func init() { register(newVolumeCmd) }

func newVolumeCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "volume",
		Short: "Manage named volumes",
		Long: `Manage named volumes: ext4 disks whose data outlives sandboxes. Attach one
with 'matchlock run -v @NAME:/path'. One sandbox at a time may use a volume.
Volumes live under $MATCHLOCK_HOME/volumes (default ~/.matchlock/volumes).`,
	}
	cmd.AddCommand(newVolumeCreateCmd(), newVolumeLsCmd(), newVolumeRmCmd())
	return cmd
}

func newVolumeCreateCmd() *cobra.Command {
	var size int
	cmd := &cobra.Command{
		Use:   "create NAME",
		Short: "Create an empty volume",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			info, err := workspace.CreateVolume(cmd.Context(), args[0], size)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), info.Name)
			return nil
		},
	}
	cmd.Flags().IntVar(&size, "size", workspace.DefaultVolumeMiB, "capacity in MiB (the image is sparse: it takes what is written)")
	return cmd
}

func newVolumeLsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List volumes",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			vols, err := workspace.ListVolumes()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				if vols == nil {
					vols = []workspace.VolumeInfo{}
				}
				return writeJSON(out, vols)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tSIZE\tUSED\tIN USE")
			for _, v := range vols {
				inUse := "no"
				if v.InUse {
					inUse = "yes"
				}
				fmt.Fprintf(tw, "%s\t%d MiB\t%.1f MiB\t%s\n", v.Name, v.SizeBytes>>20, float64(v.UsedBytes)/(1<<20), inUse)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newVolumeRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "rm NAME...",
		Aliases: []string{"remove"},
		Short:   "Delete volumes and their data",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, name := range args {
				if err := workspace.RemoveVolume(name); err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), name)
			}
			return nil
		},
	}
}

// addMounts turns run's -v and --workspace values into sandbox options.
func addMounts(opts *sandbox.Options, volumes []string, ws string) error {
	if ws != "" {
		volumes = append([]string{ws + ":/workspace"}, volumes...)
	}
	for _, v := range volumes {
		m, vm, err := sandbox.ParseMountFlag(v)
		if err != nil {
			return err
		}
		if m != nil {
			opts.Mounts = append(opts.Mounts, *m)
		} else {
			opts.Volumes = append(opts.Volumes, *vm)
		}
	}
	return nil
}
