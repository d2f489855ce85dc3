package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"matchlock.dev/matchlock/image"
)

func init() { register(newPullCmd) }

func newPullCmd() *cobra.Command {
	var platform string
	var quiet bool
	cmd := &cobra.Command{
		Use:   "pull IMAGE",
		Short: "Fetch an image from a registry into the local store",
		Long: "Fetch an image from a registry into the local store. Short names resolve like docker's\n" +
			"(busybox is busybox:latest on Docker Hub); registries on localhost are spoken to over HTTP.\n" +
			"Credentials come from docker's config (docker login).",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := imageSignalContext(cmd.Context())
			defer stop()
			s, err := image.OpenDefault()
			if err != nil {
				return err
			}
			defer s.Close()
			out := cmd.OutOrStdout()
			var bar *pullProgress
			if !quiet && imageIsTerminal(out) {
				bar = newPullProgress(out)
			}
			img, err := s.Pull(ctx, args[0], image.PullOptions{Platform: platform, Progress: bar.update})
			bar.finish()
			if err != nil {
				return err
			}
			if quiet {
				fmt.Fprintln(out, img.Digest)
				return nil
			}
			fmt.Fprintf(out, "%s\ndigest: %s\nsize:   %s (%s, %d layers)\n", img.Name(), img.Digest,
				image.HumanSize(img.Size), img.Platform, len(img.Layers))
			return nil
		},
	}
	cmd.Flags().StringVar(&platform, "platform", "", "platform to pick from a multi-arch image, e.g. linux/arm64 (default linux/<this machine>)")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only the digest, no progress")
	return cmd
}

// imageSignalContext is cancelled by SIGINT or SIGTERM, so that an interrupted
// pull or import cleans up after itself.
func imageSignalContext(parent context.Context) (context.Context, context.CancelFunc) {
	if parent == nil {
		parent = context.Background()
	}
	return signal.NotifyContext(parent, os.Interrupt, syscall.SIGTERM)
}

func imageIsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// pullProgress draws one line per layer on a terminal, redrawn in place.
// A nil *pullProgress draws nothing.
type pullProgress struct {
	w      io.Writer
	mu     sync.Mutex
	layers map[string]image.ProgressUpdate
	drawn  int // lines on screen
	last   time.Time
}

func newPullProgress(w io.Writer) *pullProgress {
	return &pullProgress{w: w, layers: map[string]image.ProgressUpdate{}}
}

func (p *pullProgress) update(u image.ProgressUpdate) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.layers[u.Layer] = u
	if !u.Done && time.Since(p.last) < 100*time.Millisecond {
		return
	}
	p.draw()
}

func (p *pullProgress) finish() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.draw()
}

func (p *pullProgress) draw() {
	p.last = time.Now()
	ups := make([]image.ProgressUpdate, 0, len(p.layers))
	for _, u := range p.layers {
		ups = append(ups, u)
	}
	sort.Slice(ups, func(i, j int) bool { return ups[i].Index < ups[j].Index })
	var b strings.Builder
	if p.drawn > 0 {
		fmt.Fprintf(&b, "\x1b[%dA", p.drawn) // back to the first line
	}
	for _, u := range ups {
		b.WriteString("\x1b[2K")
		b.WriteString(pullProgressLine(u))
		b.WriteString("\n")
	}
	p.drawn = len(ups)
	io.WriteString(p.w, b.String())
}

func pullProgressLine(u image.ProgressUpdate) string {
	id := image.ShortDigest(u.Layer)
	switch {
	case u.Cached:
		return id + ": already present"
	case u.Done:
		return fmt.Sprintf("%s: done       %s", id, image.HumanSize(u.Total))
	}
	const width = 30
	filled := 0
	if u.Total > 0 {
		filled = int(min(u.Complete, u.Total) * width / u.Total)
	}
	return fmt.Sprintf("%s: [%s%s] %s / %s", id, strings.Repeat("=", filled), strings.Repeat(" ", width-filled),
		image.HumanSize(u.Complete), image.HumanSize(u.Total))
}
