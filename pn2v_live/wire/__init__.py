"""The ZeroMQ wire: the message protocol (`protocol`), a sender for acquisition code (`sender`)
and a simulated microscope (`simulate`). The receiving end is a daemon stage,
`pipeline.zmq_source`; nothing here imports it."""
