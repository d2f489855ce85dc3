package sandbox

import (
	"errors"
	"reflect"
	"testing"
)

func TestCommandLine(t *testing.T) {
	empty := ""
	echo := "/bin/echo"
	img := ImageConfig{Entrypoint: []string{"/ep", "-x"}, Cmd: []string{"default"}}
	for _, tc := range []struct {
		name  string
		img   ImageConfig
		entry *string
		args  []string
		want  []string
		err   error
	}{
		{"entrypoint+cmd", img, nil, nil, []string{"/ep", "-x", "default"}, nil},
		{"args replace cmd", img, nil, []string{"a", "b"}, []string{"/ep", "-x", "a", "b"}, nil},
		{"override entrypoint drops cmd", img, &echo, nil, []string{"/bin/echo"}, nil},
		{"override entrypoint with args", img, &echo, []string{"hi"}, []string{"/bin/echo", "hi"}, nil},
		{"cleared entrypoint", img, &empty, []string{"ls"}, []string{"ls"}, nil},
		{"cleared entrypoint no args", img, &empty, nil, nil, ErrNoCommand},
		{"cmd only", ImageConfig{Cmd: []string{"sh"}}, nil, nil, []string{"sh"}, nil},
		{"nothing", ImageConfig{}, nil, nil, nil, ErrNoCommand},
	} {
		got, err := CommandLine(tc.img, tc.entry, tc.args)
		if !errors.Is(err, tc.err) || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %q, %v; want %q, %v", tc.name, got, err, tc.want, tc.err)
		}
	}
}

func TestMergeEnv(t *testing.T) {
	got := MergeEnv([]string{"A=1", "PATH=/bin", "B=2"}, []string{"B=3", "C=4", "A=5"})
	want := []string{"A=5", "PATH=/bin", "B=3", "C=4"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %q want %q", got, want)
	}
}

func TestResolveDefaults(t *testing.T) {
	img := ImageConfig{Cmd: []string{"sh"}, Env: []string{"X=1"}, WorkingDir: "/w", User: "u"}
	o, err := ProcessSpec{Env: []string{"Y=2"}}.Resolve(img)
	if err != nil || o.Dir != "/w" || o.User != "u" || !reflect.DeepEqual(o.Env, []string{"X=1", "Y=2"}) {
		t.Fatalf("%+v %v", o, err)
	}
	o, _ = ProcessSpec{Dir: "/d", User: "root"}.Resolve(img)
	if o.Dir != "/d" || o.User != "root" {
		t.Fatalf("%+v", o)
	}
}
