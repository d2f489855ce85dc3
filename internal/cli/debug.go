package cli

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/sandbox"
)

func init() { register(newDebugCmd) }

// newDebugCmd holds hidden commands used by bench/ and by developers.
func newDebugCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "debug", Short: "Developer tools", Hidden: true}
	var image, accel string
	var n int
	ping := &cobra.Command{
		Use:   "ping --image IMAGE [-n N]",
		Short: "Boot a sandbox and print the median control-channel round trip in ns",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if n < 1 {
				return fmt.Errorf("-n %d: want at least 1", n)
			}
			ctx := context.Background()
			sb, err := sandbox.New(ctx, sandbox.Options{Image: image, Images: imageSource("missing"), Accel: accel, MemoryMiB: 256})
			if err != nil {
				return err
			}
			defer sb.Close()
			ds := make([]time.Duration, 0, n)
			for i := 0; i < n; i++ {
				d, err := sb.Ping(ctx)
				if err != nil {
					return err
				}
				ds = append(ds, d)
			}
			sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
			fmt.Fprintln(cmd.OutOrStdout(), ds[len(ds)/2].Nanoseconds())
			return nil
		},
	}
	ping.Flags().StringVar(&image, "image", "busybox:latest", "image")
	ping.Flags().StringVar(&accel, "accel", "", "kvm or tcg")
	ping.Flags().IntVarP(&n, "n", "n", 1000, "round trips")
	cmd.AddCommand(ping)
	return cmd
}
