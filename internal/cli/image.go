package cli

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"matchlock.dev/matchlock/image"
)

func init() { register(newImageCmd) }

func newImageCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Manage the local image store",
		Long: "Manage the local image store (under $MATCHLOCK_CACHE/images, default\n" +
			"${XDG_CACHE_HOME:-~/.cache}/matchlock/images).",
	}
	cmd.AddCommand(newImageLsCmd(), newImageRmCmd(), newImageImportCmd(), newImageTagCmd(),
		newImageInspectCmd(), newImagePruneCmd())
	return cmd
}

// withImageStore opens the default store for the length of fn.
func withImageStore(fn func(*image.Store) error) error {
	s, err := image.OpenDefault()
	if err != nil {
		return err
	}
	defer s.Close()
	return fn(s)
}

func newImageLsCmd() *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:     "ls",
		Aliases: []string{"list"},
		Short:   "List images",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return withImageStore(func(s *image.Store) error {
				imgs, err := s.List()
				if err != nil {
					return err
				}
				out := cmd.OutOrStdout()
				if asJSON {
					if imgs == nil {
						imgs = []*image.Image{}
					}
					return writeJSON(out, imgs)
				}
				tw := tabwriter.NewWriter(out, 0, 4, 3, ' ', 0)
				fmt.Fprintln(tw, "REPOSITORY:TAG\tDIGEST\tSIZE\tCREATED")
				now := time.Now()
				for _, img := range imgs {
					name := img.Name()
					if img.Repo == "" {
						name = "<none>"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", name, image.ShortDigest(img.Digest), image.HumanSize(img.Size), imageAgo(now, img.Created))
				}
				return tw.Flush()
			})
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON array")
	return cmd
}

func newImageRmCmd() *cobra.Command {
	return &cobra.Command{
		Use:     "rm IMAGE...",
		Aliases: []string{"remove"},
		Short:   "Remove image names; an image goes with its last name (space comes back with prune)",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withImageStore(func(s *image.Store) error {
				var failed []string
				for _, ref := range args {
					if err := s.Remove(ref); err != nil {
						failed = append(failed, err.Error())
						continue
					}
					fmt.Fprintf(cmd.OutOrStdout(), "removed %s\n", ref)
				}
				if len(failed) > 0 {
					return errors.New(strings.Join(failed, "; "))
				}
				return nil
			})
		},
	}
}

func newImageImportCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "import TAG [FILE|-]",
		Short: "Import a docker save tarball, an OCI layout tar, or a root filesystem tar",
		Long: "Import an image archive from FILE (or standard input) and name it TAG. Accepted: a `docker save`\n" +
			"tarball, a tar of an OCI image layout, or a plain root filesystem tar (a one-layer image with\n" +
			"an empty config, like `docker import`); gzip, zstd and bzip2 compression are detected.",
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := imageSignalContext(cmd.Context())
			defer stop()
			var in io.Reader = cmd.InOrStdin()
			if len(args) == 2 && args[1] != "-" {
				f, err := os.Open(args[1])
				if err != nil {
					return fmt.Errorf("import %s: %w", args[0], err)
				}
				defer f.Close()
				in = f
			}
			return withImageStore(func(s *image.Store) error {
				img, err := s.Import(ctx, args[0], in)
				if err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s\ndigest: %s\nsize:   %s (%s, %d layers)\n", img.Name(), img.Digest,
					image.HumanSize(img.Size), img.Platform, len(img.Layers))
				return nil
			})
		},
	}
}

func newImageTagCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "tag SRC DST",
		Short: "Give an image another name",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withImageStore(func(s *image.Store) error { return s.Tag(args[0], args[1]) })
		},
	}
}

func newImageInspectCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "inspect IMAGE",
		Short: "Print an image's details as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withImageStore(func(s *image.Store) error {
				img, err := s.Resolve(args[0])
				if err != nil {
					return err
				}
				return writeJSON(cmd.OutOrStdout(), img)
			})
		},
	}
}

func newImagePruneCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "prune",
		Short: "Delete unnamed images, and blobs and disks no image uses",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := imageSignalContext(cmd.Context())
			defer stop()
			return withImageStore(func(s *image.Store) error {
				rep, err := s.Prune(ctx)
				if err != nil {
					return err
				}
				fmt.Fprintln(cmd.OutOrStdout(), rep)
				return nil
			})
		},
	}
}

// writeJSON prints v as indented JSON.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// ago says how long before now t was, as docker's CREATED column does.
func imageAgo(now, t time.Time) string {
	d := now.Sub(t)
	switch {
	case t.IsZero():
		return "unknown"
	case d < time.Minute:
		return "just now"
	case d < time.Hour:
		return imagePlural(int(d.Minutes()), "minute") + " ago"
	case d < 48*time.Hour:
		return imagePlural(int(d.Hours()), "hour") + " ago"
	case d < 60*24*time.Hour:
		return imagePlural(int(d.Hours()/24), "day") + " ago"
	case d < 2*365*24*time.Hour:
		return imagePlural(int(d.Hours()/24/30), "month") + " ago"
	}
	return imagePlural(int(d.Hours()/24/365), "year") + " ago"
}

func imagePlural(n int, unit string) string {
	if n == 1 {
		return "1 " + unit
	}
	return fmt.Sprintf("%d %ss", n, unit)
}
