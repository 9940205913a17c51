"""The Ray Serve layer of neuron-serve: HTTP ingress speaking TGI, NeuronBatcher replicas, app builder."""
