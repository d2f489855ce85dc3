package cli

import "matchlock.dev/matchlock/sandbox"

// imageSource is the image store with a pull policy ("missing", "always",
// "never"), shared by run, debug and the supervisor.
func imageSource(pull string) sandbox.ImageSource {
	return &sandbox.StoreSource{Policy: sandbox.PullPolicy(pull)}
}
