//! A TCP proxy the test controls: put a service behind it, cut it (every
//! open connection dropped, new ones refused), stall it (connections stay
//! open and carry nothing, as with a hung server or a dropped route), restore it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    stalled: watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(target: &'static str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("proxy bind: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let open = Arc::new(AtomicBool::new(true));
        let (generation, gen_rx) = watch::channel(0u64);
        let (stalled, stall_rx) = watch::channel(false);
        let accept_open = open.clone();
        actix_web::rt::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !accept_open.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let mut killed = gen_rx.clone();
                let born = *killed.borrow_and_update();
                let mut stall = stall_rx.clone();
                actix_web::rt::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    let until_cut = |mut killed: watch::Receiver<u64>| async move {
                        while killed.changed().await.is_ok() {
                            if *killed.borrow() != born {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = until_cut(killed.clone()) => {}
                        // Stalled: both sockets stay open and carry nothing
                        // until the connection is cut.
                        stalled = stall.wait_for(|s| *s) => {
                            drop(stalled);
                            until_cut(killed.clone()).await;
                        }
                    }
                });
            }
        });
        TcpProxy {
            port,
            open,
            generation,
            stalled,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Every connection, open or new, stops carrying bytes but stays open.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// New connections work again (stalled ones stay stalled until cut).
    pub fn restore(&self) {
        self.stalled.send_replace(false);
        self.open.store(true, Ordering::Release);
    }
}
