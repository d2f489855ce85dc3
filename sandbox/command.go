package sandbox

import (
	"errors"
	"strings"
)

// ErrNoCommand means neither the caller nor the image named a command.
var ErrNoCommand = errors.New("no command given and the image has no ENTRYPOINT or CMD")

// CommandLine applies Docker's rules: ENTRYPOINT + (args or CMD). A non-nil
// entrypoint replaces the image's ENTRYPOINT and drops its CMD; an empty
// *entrypoint clears it.
func CommandLine(img ImageConfig, entrypoint *string, args []string) ([]string, error) {
	entry := img.Entrypoint
	cmd := img.Cmd
	if entrypoint != nil {
		entry = nil
		if *entrypoint != "" {
			entry = []string{*entrypoint}
		}
		cmd = nil
	}
	if len(args) > 0 {
		cmd = args
	}
	argv := append(append([]string(nil), entry...), cmd...)
	if len(argv) == 0 {
		return nil, ErrNoCommand
	}
	return argv, nil
}

// MergeEnv overlays extra on base (KEY=VALUE lists); later keys win and
// first-seen order is kept.
func MergeEnv(base, extra []string) []string {
	var out []string
	idx := map[string]int{}
	for _, kv := range append(append([]string(nil), base...), extra...) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			continue
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	return out
}

// ProcessSpec is a command as a user states it, before the image config
// fills in the rest (see Resolve).
type ProcessSpec struct {
	Args       []string `json:"args,omitempty"`
	Entrypoint *string  `json:"entrypoint,omitempty"`
	Env        []string `json:"env,omitempty"` // extra KEY=VALUE over the image's
	Dir        string   `json:"dir,omitempty"`
	User       string   `json:"user,omitempty"`
	Stdin      bool     `json:"stdin,omitempty"`
	TTY        bool     `json:"tty,omitempty"`
}

// Resolve turns a spec into ExecOptions using the image config for
// whatever the spec leaves out.
func (p ProcessSpec) Resolve(img ImageConfig) (ExecOptions, error) {
	argv, err := CommandLine(img, p.Entrypoint, p.Args)
	if err != nil {
		return ExecOptions{}, err
	}
	o := ExecOptions{Argv: argv, Env: MergeEnv(img.Env, p.Env), Dir: p.Dir, User: p.User, Stdin: p.Stdin, TTY: p.TTY}
	if o.Dir == "" {
		o.Dir = img.WorkingDir
	}
	if o.User == "" {
		o.User = img.User
	}
	return o, nil
}
