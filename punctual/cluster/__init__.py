"""Several engine replicas behind one front end, on Ray: replicas, the router, failover."""
