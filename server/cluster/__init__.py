"""Scale-out on Ray Serve (`adapter-server cluster`): engine replicas behind an ingress that routes each
request to a replica already holding its adapter. Imported only by that command: the single-node
server never imports Ray.
"""
