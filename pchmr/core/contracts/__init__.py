"""What plugins implement and receive: the Sample schema, the body model, backbone, dataset,
partitioner, strategy and mechanism, annotator and source contracts, option declarations and errors.

This layer is the sink of pchmr: it imports torch and numpy only (Flower and Lightning only for
type checking), and nothing else of pchmr's.
"""
